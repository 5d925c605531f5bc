"""Shared helpers for the casern benches: timing, RSS, raw SQLite baselines, tables.

Every bench measures casern against a raw baseline *in the same run* (same
machine, same file system, same pragmas, same JSON sizes) and prints a ratio.
Nothing here asserts or fails on timing: benches inform, tests decide.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

# `python bench/NAME.py` from the repo root: make `casern` and `bench` importable
# even without the editable install.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def now() -> float:
    return time.perf_counter()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run `fn` once; return (seconds, result)."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    """The fastest of `repeat` runs of `fn`, in seconds (least disturbed by noise)."""
    return min(timed(fn)[0] for _ in range(max(1, repeat)))


def rss_mb() -> float:
    """Resident set size of this process in MB (VmRSS from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """Print a plain-text table, numbers right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    sys.stdout.flush()


def ratio_line(name: str, value: float, goal: str) -> str:
    return f"RATIO {name} = {value:.2f}x (goal {goal})"


@contextlib.contextmanager
def temp_dir(base: str | None = None, keep: bool = False) -> Iterator[Path]:
    """A fresh directory for database files (removed afterwards unless `keep`)."""
    path = Path(tempfile.mkdtemp(prefix="casern-bench-", dir=base))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def sqlite_url(path: Path, synchronous: str = "normal") -> str:
    """casern's URL for an absolute file path."""
    url = f"sqlite:///{path.resolve()}"  # "/abs" -> sqlite:////abs
    return url if synchronous == "normal" else f"{url}?synchronous={synchronous}"


def bulk_load_couch(url: str, docs: Iterable[dict[str, Any]], chunk: int = 5_000) -> None:
    """POST documents to a CouchDB database's `_bulk_docs` in chunks; stop on any error."""
    import httpx

    def post(client: httpx.Client, part: list[dict[str, Any]]) -> None:
        r = client.post(url + "/_bulk_docs", json={"docs": part})
        r.raise_for_status()
        bad = [row for row in r.json() if "error" in row]
        if bad:
            raise SystemExit(f"populating CouchDB failed: {bad[:3]}")

    with httpx.Client(timeout=300.0, headers={"Accept": "application/json"}) as client:
        part: list[dict[str, Any]] = []
        for doc in docs:
            part.append(doc)
            if len(part) == chunk:
                post(client, part)
                part = []
        if part:
            post(client, part)


# -- the raw baseline: stdlib sqlite3, one JSON row per id ----------------------------------


def raw_connect(
    path: Path, synchronous: str = "normal", timeout: float = 30.0
) -> sqlite3.Connection:
    """A connection with casern's pragmas: WAL, synchronous=NORMAL, autocommit mode."""
    db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous.upper()}")
    db.execute(
        "CREATE TABLE IF NOT EXISTS kv"
        " (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, doc TEXT NOT NULL)"
    )
    return db


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def raw_rmw(
    db: sqlite3.Connection, id: str, reduce: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """One raw read-modify-write: BEGIN IMMEDIATE, SELECT, reduce, UPDATE/INSERT, COMMIT."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT rev, doc FROM kv WHERE id = ?", (id,)).fetchone()
        if row is None:
            state = reduce({})
            db.execute("INSERT INTO kv (id, rev, doc) VALUES (?, 1, ?)", (id, dumps(state)))
        else:
            state = reduce(json.loads(row[1]))
            db.execute(
                "UPDATE kv SET rev = ?, doc = ? WHERE id = ? AND rev = ?",
                (row[0] + 1, dumps(state), id, row[0]),
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return state


# -- the workload shared by casern and the raw baseline -------------------------------------


def make_reducer(pad_bytes: int) -> Callable[[Any, dict[str, Any], Any], dict[str, Any]]:
    """A small pure reducer: count, remember the last data, keep a fixed-size payload."""
    pad = "x" * pad_bytes

    def bump(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1, "last": data, "pad": pad}

    return bump


def python_info() -> str:
    return (
        f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPU(s), pid {os.getpid()}"
    )
