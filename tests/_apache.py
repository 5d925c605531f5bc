"""A real Apache CouchDB 3.5 for tests: a single node or a 3-node cluster on loopback.

The release and its scripts (`unpack.sh`, `start.sh`, `node.sh`, `stop.sh`) live
in a folder named by `CASERN_COUCHDB_DIST`, by default `../shared/couchdb` beside
the repository. `ApacheCouch` starts one on free ports and stops what it
started; `kill(i)` / `start_node(i)` crash and restart one node of a cluster.

`CASERN_COUCHDB_CLUSTER=DATAROOT` names a cluster someone else started (as
`.ci/run` does): it is used as is and left running. `CASERN_REQUIRE_APACHE=1`
(set by `.ci/run`) turns "no Apache CouchDB here" from a skip into an error.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["ApacheCouch", "NoApache", "dist_dir", "require_apache"]

ROOT = Path(__file__).resolve().parent.parent
ENV_DIST = "CASERN_COUCHDB_DIST"
ENV_CLUSTER = "CASERN_COUCHDB_CLUSTER"
ENV_REQUIRE = "CASERN_REQUIRE_APACHE"
ADMIN = "admin:pw"  # what start.sh sets up (COUCH_ADMIN / COUCH_PASS)


class NoApache(RuntimeError):
    """No Apache CouchDB release here (the message says where it was looked for)."""


def require_apache() -> bool:
    return os.environ.get(ENV_REQUIRE, "") not in ("", "0")


def dist_dir() -> Path:
    """The folder holding the release scripts, or `NoApache`."""
    where = Path(os.environ.get(ENV_DIST) or ROOT.parent / "shared" / "couchdb")
    if not (where / "start.sh").exists() or not (where / "unpack.sh").exists():
        raise NoApache(
            f"no Apache CouchDB release scripts in {where}: set {ENV_DIST} to the folder"
            " holding unpack.sh, start.sh, node.sh and stop.sh"
        )
    return where


def release_dir() -> Path:
    """Unpack the release once (unpack.sh caches it) and return its folder."""
    out = subprocess.run(
        [str(dist_dir() / "unpack.sh")], capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        raise NoApache(f"unpack.sh failed: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base(nodes: int) -> int:
    """A base port whose node ports (base + 10*i, and + 1 each) are all free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + 10 * nodes + 1 > 65535:
            continue
        if all(_free(base + 10 * i + k) for i in range(nodes) for k in (0, 1)):
            return base
    raise RuntimeError("no free ports for Apache CouchDB on 127.0.0.1")


class ApacheCouch:
    """One Apache CouchDB: `nodes=1` a single node, `nodes=3` a cluster (n=3, q=2)."""

    def __init__(self, nodes: int = 1) -> None:
        self.nodes = nodes
        self.rel = release_dir()
        self.dist = dist_dir()
        self.dir = ""
        self.base = 0
        self.owned = True

    @classmethod
    def attach(cls, dataroot: str) -> ApacheCouch:
        """A cluster started elsewhere (`CASERN_COUCHDB_CLUSTER`), node ports from its config."""
        self = cls(nodes=len(list(Path(dataroot).glob("node*/etc/local.ini"))))
        self.dir, self.owned = dataroot, False
        ini = Path(dataroot, "node1", "etc", "local.ini").read_text()
        match = re.search(r"\[chttpd\][^\[]*?port = (\d+)", ini)
        if match is None:
            raise NoApache(f"{dataroot}/node1/etc/local.ini names no chttpd port")
        self.base = int(match.group(1))
        return self

    def urls(self) -> list[str]:
        """Every node's base URL, with the admin credentials."""
        return [f"http://{ADMIN}@127.0.0.1:{self.base + 10 * i}" for i in range(self.nodes)]

    @property
    def url(self) -> str:
        return self.urls()[0]

    def start(self) -> ApacheCouch:
        self.dir = tempfile.mkdtemp(prefix="casern-apache-")
        self.base = _free_base(self.nodes)
        argv = [str(self.dist / "start.sh")]
        if self.nodes > 1:
            argv += ["--cluster", str(self.rel), str(self.base), self.dir, str(self.nodes)]
        else:
            argv += [str(self.rel), str(self.base), self.dir]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"start.sh failed: {out.stderr[-3000:]}")
        return self

    def kill(self, node: int) -> None:
        """SIGKILL node `node` (1-based): a crash."""
        self._node("kill", self.dir, str(node))

    def start_node(self, node: int) -> None:
        """Start node `node` again on its data; returns once it answers."""
        self._node("start", str(self.rel), self.dir, str(node))

    def _node(self, *args: str) -> None:
        out = subprocess.run(
            [str(self.dist / "node.sh"), *args], capture_output=True, text=True, timeout=300
        )
        if out.returncode != 0:
            raise RuntimeError(f"node.sh {' '.join(args)} failed: {out.stderr[-2000:]}")

    def stop(self) -> None:
        """Stop what start() started (epmd is shared: always kept)."""
        if not self.owned or not self.dir:
            return
        subprocess.run(
            [str(self.dist / "stop.sh"), "--keep-epmd", self.dir],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = ""

    def __enter__(self) -> ApacheCouch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
