"""docker-compose.yml without Docker: the file parses, and its services run as plain processes.

`docker compose config` (or the older `docker-compose config`) resolves the file as Compose does: merges,
anchors, ${VAR:-default} interpolation. The test then starts migrate, api, worker-gpu, worker-cpu and beat
with exactly those commands and environments, with only the addresses of the containers' world mapped to
this machine (PostgreSQL, Redis, the /data volume, the port), and runs one job through them: the job is
trained by worker-gpu, and its webhook is sent by the beat's task on worker-cpu (the API sends none).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.test_webhooks import receiver
from tests.conftest import (
    MODEL_STORE,
    PG_ADMIN_URL,
    REDIS_URL,
    REPO,
    _admin_execute,
    emotion_rows,
    free_port,
    write_jsonl,
)

BIN = Path(sys.executable).parent
# Set by the Dockerfile (ENV) in every image; the compose services inherit them.
IMAGE_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
SERVICES = ["api", "worker-gpu", "worker-cpu", "beat"]


def compose_tool() -> list[str] | None:
    for tool in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(tool[0]) and subprocess.run([*tool, "version"], capture_output=True).returncode == 0:
            return tool
    return None


def resolved_compose(env: dict[str, str]) -> dict:
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    args = [*tool, "-f", str(REPO / "docker-compose.yml"), "config"]
    env = {"FLOWER_BASIC_AUTH": "test:test"} | env  # required: compose refuses the file without it
    if tool == ["docker", "compose"]:
        args += ["--format", "json"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--format" in args else yaml.safe_load(result.stdout)


def test_compose_file_parses_and_declares_the_production_shape():
    config = resolved_compose(os.environ | {"GROVE_WEBHOOK_ALLOWED_HOSTS": ""})
    services = config["services"]
    assert {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu", "beat", "flower"} <= set(services)
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"] and services[name]["volumes"]
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert "--workers" in services["api"]["command"]
    gpu = services["worker-gpu"]
    assert gpu["build"]["target"] == "cuda" and services["worker-cpu"]["build"]["target"] == "cpu"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["command"][gpu["command"].index("--concurrency") + 1] == "1"
    assert services["beat"]["command"][3] == "beat"
    assert services["flower"]["image"].startswith("mher/flower:")
    # The artifact store is one named volume shared by the API and every worker.
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert any(str(v).startswith("grove-data:/data") or (isinstance(v, dict) and v.get("source") == "grove-data")
                   for v in services[name]["volumes"]), name  # fmt: skip
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "AS cpu" in dockerfile and "AS cuda" in dockerfile and "\nUSER grove" in dockerfile


def _redis_db() -> str:
    """An empty Redis database of its own, so that the compose queue names meet no other test's."""
    import redis

    base = REDIS_URL.rsplit("/", 1)[0]
    for db in range(15, 7, -1):
        client = redis.Redis.from_url(f"{base}/{db}")
        if client.dbsize() == 0:
            client.set("grove-compose-test", RUN_MARK, ex=900)
            return f"{base}/{db}"
    pytest.skip("no empty Redis database")


RUN_MARK = uuid.uuid4().hex[:8]


class Processes:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _localize(value: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        value = value.replace(old, new)
    return value


def test_compose_services_run_a_job_as_plain_processes(tmp_path, tiny_model):
    root = tmp_path
    db_name = f"grove_compose_{RUN_MARK}"
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}"
    redis_url = _redis_db()
    port = free_port()
    (root / "prometheus").mkdir()
    base_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    config = resolved_compose(base_env | {"GROVE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "GROVE_API_WORKERS": "2"})
    # Only the container world is mapped: service host names, the /data volume, the tmpfs, the port.
    mapping = {
        "postgresql+psycopg://grove:grove@postgres:5432/grove": db_url,
        "redis://redis:6379/0": redis_url,
        "/data/storage": str(root / "storage"),
        "/data/work": str(root / "work"),
        "/data/models": str(MODEL_STORE),
        "/tmp/prometheus": str(root / "prometheus"),
        "/tmp/celerybeat-schedule": str(root / "celerybeat-schedule"),
    }

    def service(name: str) -> tuple[list[str], dict[str, str]]:
        spec = config["services"][name]
        env = base_env | IMAGE_ENV | {k: _localize(str(v), mapping) for k, v in (spec.get("environment") or {}).items()}
        command = [_localize(str(a), mapping) for a in spec["command"]]
        command[0] = str(BIN / command[0]) if (BIN / command[0]).exists() else command[0]
        if name == "api":  # the published port, on loopback only
            command[command.index("--port") + 1] = str(port)
            command[command.index("--host") + 1] = "127.0.0.1"
        if command[:1] == [str(BIN / "celery")] and "--hostname" in command:
            i = command.index("--hostname") + 1
            command[i] = command[i].replace("@%h", f"-{RUN_MARK}@%h")
        return command, env

    _admin_execute(f'CREATE DATABASE "{db_name}"')
    processes = Processes(root)
    try:
        command, env = service("migrate")
        migrated = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stderr

        for name in SERVICES:
            processes.start(name, *service(name))
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert processes.procs["api"].poll() is None, processes.log("api")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, processes.log("api")
            time.sleep(0.5)

        # `docker compose exec api grove keys create --project acme`
        _, api_env = service("api")
        made = subprocess.run(
            [str(BIN / "grove"), "keys", "create", "--project", "compose"],
            cwd=REPO, env=api_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        auth = {"Authorization": f"Bearer {key}"}

        with receiver() as hooks:
            endpoint = httpx.post(
                f"{base_url}/v1/webhook_endpoints",
                headers=auth,
                json={"name": "ci", "url": hooks.url, "event_types": ["fine_tuning.job.succeeded"]},
            )
            assert endpoint.status_code == 200, endpoint.text

            train = write_jsonl(root / "train.jsonl", emotion_rows(16))
            client_env = base_env | {"GROVE_BASE_URL": base_url, "GROVE_API_KEY": key, "GROVE_CONFIG": str(root / "x")}
            run = subprocess.run(
                [str(BIN / "grove"), "finetune", "create", "-m", "tiny-llama-test", "-t", str(train),
                 "--template", "{text} -> {label}", "--max-steps", "3", "--wait"],
                cwd=root, env=client_env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert run.returncode == 0, (run.stdout, run.stderr, processes.log("worker-gpu"))
            assert "succeeded" in run.stdout

            hooks.wait_for(1, timeout=60)
            assert json.loads(hooks.requests[0][1])["type"] == "fine_tuning.job.succeeded"

        worker_gpu_log = processes.log("worker-gpu")
        assert "grove.fine_tune" in worker_gpu_log
        assert "grove.send_webhooks" in processes.log("worker-cpu")
        assert "Scheduler: Sending due task" in processes.log("beat")

        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(f"{base_url}/metrics", timeout=30).text
            families = {f.name: f for f in text_string_to_metric_families(text)}
            up = {s.labels["queue"]: s.value for s in families["grove_workers_up"].samples}
            if up.get("fine_tune", 0) >= 1 and up.get("maintenance", 0) >= 1:
                break
            assert time.monotonic() < deadline, up
            time.sleep(1)
        # Two uvicorn processes, one set of HTTP metrics (PROMETHEUS_MULTIPROC_DIR).
        assert any(p.name.endswith(".db") for p in (root / "prometheus").iterdir())
        assert any(
            s.labels.get("route") == "/v1/webhook_endpoints"
            for s in families["grove_http_request_duration_seconds"].samples
        )
    finally:
        processes.stop()
        _admin_execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        import redis

        redis.Redis.from_url(redis_url).flushdb()
