"""Can group commit make 8 sending threads faster than one? The floor in CPython.

A blocking `send` from T threads, modelled with nothing of casern in it: each
send does `--work` json.loads of a 240-byte state (casern's Python per send is
≈ 60-80 µs, a loads is ≈ 1.5 µs), then commits one UPDATE to SQLite (WAL,
synchronous=NORMAL) by one of three designs:

  own commit     the sending thread commits its own send, one transaction
                 each, behind one lock (T = 1: plain sequential sends)
  group commit   casern's design: a sender queues its send and, if nobody
                 is writing, leads: it writes everything queued in one
                 transaction; the others wait on a Future until their send
                 is written
  raw, T conns   each thread its own connection, BEGIN IMMEDIATE (the raw
                 baseline of bench/sqlite_send.py)

Under the GIL only SQLite's own work runs in parallel with Python, and a
sender woken by another thread's commit pays a thread switch. If group commit
with T threads is no faster than own commit with one thread even here, where
the per-send Python is a few loads, casern's engine cannot make it so either.

    python bench/threads_floor.py                  # 8 threads, work 0/10/40, best of 3
    python bench/threads_floor.py --work 0,40 --threads 8 --sends 16000
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from _common import print_table, python_info, temp_dir

STATE = json.dumps({"n": 1, "pad": "x" * 220})


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def prepare(path: Path, ids: int) -> None:
    db = connect(path)
    db.execute("CREATE TABLE kv (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, doc TEXT NOT NULL)")
    db.executemany("INSERT INTO kv VALUES (?, 1, ?)", ((f"k{i}", STATE) for i in range(ids)))
    db.close()


def python_work(work: int) -> None:
    for _ in range(work):
        json.loads(STATE)


UPDATE = "UPDATE kv SET rev = rev + 1, doc = ? WHERE id = ?"


class OwnCommit:
    """Each sender commits its own send, behind one lock (casern's lone `send`)."""

    def __init__(self, path: Path, work: int) -> None:
        self.db, self.work, self.lock = connect(path), work, threading.Lock()
        self.transactions = 0

    def send(self, id: str) -> None:
        python_work(self.work)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(UPDATE, (STATE, id))
            self.db.execute("COMMIT")
            self.transactions += 1


class GroupCommit:
    """Queue, and lead if nobody is writing: one transaction for everything queued."""

    def __init__(self, path: Path, work: int) -> None:
        self.db, self.work = connect(path), work
        self.lock = threading.Lock()
        self.queue: deque[tuple[str, Future[None]]] = deque()
        self.leading = False
        self.transactions = 0

    def send(self, id: str) -> None:
        python_work(self.work)
        future: Future[None] = Future()
        with self.lock:
            self.queue.append((id, future))
            lead = not self.leading
            self.leading = self.leading or lead
        if lead:
            self.lead()
        future.result()

    def lead(self) -> None:
        """Write batches until nothing is queued (the most batching there can be)."""
        while True:
            with self.lock:
                if not self.queue:
                    self.leading = False
                    return
                batch = list(self.queue)
                self.queue.clear()
            self.db.execute("BEGIN IMMEDIATE")
            for id, _ in batch:
                self.db.execute(UPDATE, (STATE, id))
            self.db.execute("COMMIT")
            self.transactions += 1
            for _, future in batch:
                future.set_result(None)


class RawConnections:
    """Each thread its own connection, BEGIN IMMEDIATE (SQLite's busy handler waits)."""

    def __init__(self, path: Path, work: int) -> None:
        self.path, self.work, self.local = path, work, threading.local()
        self.transactions = 0

    def send(self, id: str) -> None:
        python_work(self.work)
        db = getattr(self.local, "db", None)
        if db is None:
            db = self.local.db = connect(self.path)
        db.execute("BEGIN IMMEDIATE")
        db.execute(UPDATE, (STATE, id))
        db.execute("COMMIT")
        self.transactions += 1  # a data race at worst: only for the batch column


Design = Callable[[Path, int], OwnCommit | GroupCommit | RawConnections]


def run(
    design: Design, path: Path, work: int, threads: int, sends: int
) -> tuple[float, float, float]:
    """(sends/s, CPU µs per send, sends per transaction) of `sends` sends from `threads` threads."""
    model = design(path, work)
    per = sends // threads
    barrier = threading.Barrier(threads + 1)

    def sender(t: int) -> None:
        barrier.wait()
        for i in range(per):
            model.send(f"k{t * per + i}")

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    cpu, wall = time.process_time(), time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = per * threads
    return n / wall, cpu / n * 1e6, n / max(1, model.transactions)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sends", type=int, default=16_000)
    parser.add_argument("--work", default="0,10,40", help="json.loads per send, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"casern bench: group commit across CPython threads, the floor — {python_info()}")
    t = args.threads
    cases: dict[str, tuple[Design, int]] = {
        "own commit, 1 thread": (OwnCommit, 1),
        f"own commit, {t} threads": (OwnCommit, t),
        f"group commit, {t} threads": (GroupCommit, t),
        f"raw, {t} connections": (RawConnections, t),
    }
    rows: list[list[object]] = []
    ratios: list[str] = []
    with temp_dir() as base:
        for work in (int(w) for w in args.work.split(",")):
            best: dict[str, tuple[float, float, float]] = {}
            for r in range(args.repeat):
                for name, (design, threads) in cases.items():  # interleaved
                    path = base / f"w{work}-r{r}-{threads}-{design.__name__}.db"
                    prepare(path, args.sends)
                    result = run(design, path, work, threads, args.sends)
                    if name not in best or result[0] > best[name][0]:
                        best[name] = result
            one = best["own commit, 1 thread"][0]
            for name, (rate, us, batch) in best.items():
                rows.append([work, name, rate, rate / one, us, batch])
            group = best[f"group commit, {t} threads"][0]
            ratios.append(
                f"RATIO group commit {t} threads / 1 thread = {group / one:.2f}x"
                f"  [work {work}: {work} json.loads per send; > 1: group commit pays off]"
            )
    print_table(
        ["work", "design", "sends/s", "vs 1 thread", "CPU µs/send", "sends/txn"],
        rows,
        title=f"{args.sends:,} sends to distinct ids, best of {args.repeat}",
    )
    print("CPU: every thread of the process; sends/txn: sends written per transaction")
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()
