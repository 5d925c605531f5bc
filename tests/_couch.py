"""A real CouchDB-compatible server for tests and benches: pouchdb-server on loopback.

`couchdb_server()` yields a base URL (`http://127.0.0.1:PORT`, no database):
`CASERN_COUCHDB_URL` if set (a real Apache CouchDB, e.g.
`http://admin:pw@127.0.0.1:5984`), else a pouchdb-server started here, installed
on first use from the pinned lock file in tests/couchdb/ (`npm ci`, ~10 s).

`PouchServer` gives tests control over the process: `stop()` and `restart()`
(same port) for "server down → StoreUnavailable, server back → recovers"
tests. In memory by default (a restart loses every database); with
`in_memory=False` the data lives in LevelDB files in a temp dir and survives
restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PouchServer",
    "couchdb_server",
    "db_url",
    "ensure_installed",
    "free_port",
    "fresh_db_name",
]

HERE = Path(__file__).resolve().parent / "couchdb"
SERVER_JS = HERE / "node_modules" / "pouchdb-server" / "bin" / "pouchdb-server"
_STAMP = HERE / "node_modules" / ".casern-lock-sha256"
ENV_URL = "CASERN_COUCHDB_URL"


def fresh_db_name(prefix: str = "casern-test") -> str:
    """A database name no other test uses (CouchDB: lowercase letter first)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def db_url(base_url: str, name: str | None = None) -> str:
    """`base_url` + a database name (a fresh one by default)."""
    return f"{base_url.rstrip('/')}/{name or fresh_db_name()}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lock_hash() -> str:
    return hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()


def ensure_installed() -> None:
    """Run `npm ci` in tests/couchdb if node_modules is missing or older than the lock file.

    Serialised with a file lock, so parallel test processes install once.
    """
    if _STAMP.exists() and _STAMP.read_text().strip() == _lock_hash() and SERVER_JS.exists():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError(
            "the CouchDB tests need Node.js and npm (to run pouchdb-server); install them, "
            f"or point {ENV_URL} at a CouchDB server, or deselect with -m 'not couchdb'"
        )
    # The lock lives outside the checkout, so it never shows up in `git status`.
    key = hashlib.sha256(str(HERE).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"casern-npm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (
                _STAMP.exists()
                and _STAMP.read_text().strip() == _lock_hash()
                and SERVER_JS.exists()
            ):
                return  # another process installed it while we waited
            proc = subprocess.run(
                [npm, "ci", "--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund"],
                cwd=HERE,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"`npm ci` in {HERE} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
                )
            _STAMP.write_text(_lock_hash())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _answers(url: str) -> bool:
    try:
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class PouchServer:
    """One pouchdb-server process on 127.0.0.1, restartable on the same port.

    `admins={"user": "password"}` switches off "admin party": then only those
    credentials may create databases (for credential tests).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        in_memory: bool = True,
        admins: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.port = port or free_port()
        self.in_memory = in_memory
        self.admins = dict(admins or {})
        self.startup_timeout = startup_timeout
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> PouchServer:
        """Start the process (if not running) and wait until `GET /` answers."""
        if self.running:
            return self
        ensure_installed()
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="casern-pouch-")
            config: dict[str, object] = {"log": {"file": os.path.join(self._dir, "log.txt")}}
            if self.admins:
                config["admins"] = self.admins  # hashed by the server on start
            with open(os.path.join(self._dir, "config.json"), "w") as f:
                json.dump(config, f)
        argv = [
            shutil.which("node") or "node",
            str(SERVER_JS),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--config",
            os.path.join(self._dir, "config.json"),
            "-n",  # no request log on stdout (--no-stdout-logs is parsed wrongly)
        ]
        if self.in_memory:
            argv.append("--in-memory")
        else:
            argv += ["--dir", os.path.join(self._dir, "data")]
            os.makedirs(os.path.join(self._dir, "data"), exist_ok=True)
        with open(os.path.join(self._dir, "stdout.txt"), "ab") as out:
            self._proc = subprocess.Popen(
                argv,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills it all
            )
        deadline = time.monotonic() + self.startup_timeout
        while not _answers(self.base_url + "/"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.output()
                self.stop()
                raise RuntimeError(
                    f"pouchdb-server did not start on {self.base_url}:\n{log[-3000:]}"
                )
            time.sleep(0.05)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process group (SIGTERM, then SIGKILL); data dir is kept for restart()."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Leftover children in the group, if any.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self) -> PouchServer:
        """Stop and start again on the same port (in memory: all data is gone)."""
        self.stop()
        return self.start()

    def output(self) -> str:
        """What the server printed (for failure messages)."""
        if self._dir is None:
            return ""
        with contextlib.suppress(OSError):
            return Path(self._dir, "stdout.txt").read_text(errors="replace")
        return ""

    def close(self) -> None:
        """Stop and remove the temp dir (data, config, logs)."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PouchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def couchdb_server(*, in_memory: bool = True) -> Iterator[str]:
    """Yield the base URL of a CouchDB-compatible server for the duration of the block.

    `CASERN_COUCHDB_URL` wins (a real CouchDB, nothing started); otherwise a
    fresh pouchdb-server is started and stopped afterwards.
    """
    env = os.environ.get(ENV_URL)
    if env:
        yield env.rstrip("/")
        return
    with PouchServer(in_memory=in_memory) as server:
        yield server.base_url
