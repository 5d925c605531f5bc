"""A casern app that sends until it is killed: the victim of tests/test_crash.py.

    python tests/crash_sender.py STORE_URL LOGFILE [--mode log|chain] [--ids N]
                                 [--threads N] [--pause SECONDS] [--slow SECONDS]

It builds an app on STORE_URL whose listener appends one line per call to
LOGFILE (the listener's own durable log: O_APPEND, one write, fsync), calls
`start()` with a small `redeliver_after` so it redelivers whatever a killed
predecessor left pending, prints `ready`, then sends from several threads until
SIGKILL. The test imports `reducers`, `listeners` and `read_log` from here so
that its own apps behave exactly like the victim.

Modes:
- `log`: the threads send `inc` to ids c0..c{N-1}; listener `log` writes
  `log <id> <seq> <n>` for every change.
- `chain`: the threads send `inc` to "a"; listener `chain`, on a change of "a",
  writes `start a <seq> <n>`, does `change.send("inc", "b")`, sleeps `--slow`
  seconds (so that deliveries are in flight when the kill comes), then writes
  `chain a <seq> <n>`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import casern

REDELIVER_AFTER = 0.2
TICK = 0.05


def inc(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    state["n"] = state.get("n", 0) + 1
    return state


reducers = {"inc": inc}


def append_line(path: str, line: str) -> None:
    """Append one line durably: one O_APPEND write, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: str) -> list[tuple[str, str, int, int]]:
    """The log's complete lines as (listener, id, seq, n)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.split("\n")[:-1]:  # a torn last line was never acknowledged anyway
        name, id, seq, n = line.split(" ")
        out.append((name, id, int(seq), int(n)))
    return out


def listeners(mode: str, logfile: str, slow: float = 0.0) -> dict[str, Callable[..., None]]:
    def log(c: casern.Change) -> None:
        append_line(logfile, f"log {c.id} {c.seq} {c.state['n']}")

    def chain(c: casern.Change) -> None:
        if c.id != "a":
            return
        append_line(logfile, f"start {c.id} {c.seq} {c.state['n']}")
        c.send("inc", "b")
        time.sleep(slow)
        append_line(logfile, f"chain {c.id} {c.seq} {c.state['n']}")

    return {"log": log} if mode == "log" else {"chain": chain}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("logfile")
    parser.add_argument("--mode", choices=["log", "chain"], default="log")
    parser.add_argument("--ids", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.004, help="max sleep between sends")
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()

    app = casern.Casern(
        args.store,
        {},
        {},
        reducers,
        listeners(args.mode, args.logfile, args.slow),
        redeliver_after=REDELIVER_AFTER,
        tick=TICK,
    )
    app.start()
    ids = [f"c{i}" for i in range(args.ids)] if args.mode == "log" else ["a"]

    def loop(seed: int) -> None:
        rnd = random.Random(seed)
        while True:
            app.send("inc", rnd.choice(ids))
            time.sleep(rnd.uniform(0, args.pause))

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(args.threads)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()  # only if a thread died: the test sees its traceback on stderr
    sys.exit(1)


if __name__ == "__main__":
    main()
