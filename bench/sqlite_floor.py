"""How fast could a sequential SQLite send be? A hand-written floor, beside casern and raw.

`minimal` does, inline and by hand, what a casern send promises, nothing more:
validate the data (casern's JSON rules), give the reducer deep copies, normalize
its result, compare it with the current state, write the envelope (revision
checked) and a history row in one transaction, answer with a copy through a
future. It keeps the revision and state of every id in a dict (as casern's
revision cache does). `casern` is `app.send`; `raw` is the raw loop of
bench/sqlite_send.py. Figures are CPU µs per send of the sending thread
(`time.thread_time`), best of the rounds: steadier than rates on a busy machine.

    python bench/sqlite_floor.py               # 5,000 sends over 1,000 ids, 4 rounds
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from _common import make_reducer, print_table, python_info, raw_connect, raw_rmw, temp_dir

import casern
from casern._fold import now_iso, same
from casern._json import dumps, to_json
from casern.stores.sqlite import SQLiteStore

Reducer = Callable[[Any, dict[str, Any], Any], dict[str, Any]]


def raw(path: Path, ids: list[str], reducer: Reducer) -> float:
    db = raw_connect(path)
    for i, id in enumerate(ids[: len(set(ids))]):
        raw_rmw(db, id, lambda s, i=i: reducer(None, s, {"i": i}))
    start = time.thread_time()
    for i, id in enumerate(ids):
        raw_rmw(db, id, lambda s, i=i: reducer(None, s, {"i": i}))
    cpu = time.thread_time() - start
    db.close()
    return cpu


def minimal(path: Path, ids: list[str], reducer: Reducer) -> float:
    store = SQLiteStore(f"sqlite:///{path}")
    db = store._db  # casern's file layout, written by hand
    cache: dict[str, tuple[int, dict[str, Any], str, int]] = {}
    for id in dict.fromkeys(ids):
        db.execute(
            "INSERT INTO machines (id, rev, doc) VALUES (?, 1, ?)",
            (id, dumps({"state": {}, "seq": 0, "version": 1})),
        )
        cache[id] = (1, {}, "{}", 0)
    start = time.thread_time()
    for i, id in enumerate(ids):
        data_json, data = to_json({"i": i})  # validation
        answer: Future[str] = Future()
        rev, state, state_json, seq = cache[id]
        new = reducer(None, json.loads(state_json), json.loads(data_json))
        new_json, new_state = to_json(new)
        if new_json == state_json or (new_state == state and same(new_state, state)):
            continue
        seq += 1
        record = {
            "seq": seq,
            "reducer": "bump",
            "data": data,
            "key": None,
            "applied_at": now_iso(time.time()),
            "version": 1,
        }
        doc = f'{{"state":{new_json},' + dumps({"seq": seq, "version": 1})[1:]
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE machines SET rev = ?, doc = ? WHERE id = ? AND rev = ?",
            (rev + 1, doc, id, rev),
        )
        db.execute(
            "INSERT OR IGNORE INTO history (id, seq, entry) VALUES (?, ?, ?)",
            (id, seq, dumps(record)),
        )
        db.execute("COMMIT")
        cache[id] = (rev + 1, new_state, new_json, seq)
        answer.set_result(new_json)
        json.loads(answer.result())
    cpu = time.thread_time() - start
    store.close()
    return cpu


def casern_send(path: Path, ids: list[str], reducer: Reducer) -> float:
    with casern.Casern(f"sqlite:///{path}", reducers={"bump": reducer}) as app:
        for i, id in enumerate(dict.fromkeys(ids)):
            app.send("bump", id, {"i": i})
        start = time.thread_time()
        for i, id in enumerate(ids):
            app.send("bump", id, {"i": i})
        return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sends", type=int, default=5_000)
    parser.add_argument("--ids", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pad", type=int, default=200, help="bytes of padding in the state")
    args = parser.parse_args()
    print(f"casern bench: the sequential SQLite floor — {python_info()}")
    reducer = make_reducer(args.pad)
    ids = [f"m{i % args.ids:06d}" for i in range(args.sends)]
    runs: dict[str, Callable[[Path, list[str], Reducer], float]] = {
        "raw sqlite3 RMW": raw,
        "minimal casern-like send, by hand": minimal,
        "casern app.send": casern_send,
    }
    best: dict[str, float] = {}
    with temp_dir() as base:
        for round in range(args.rounds):
            for name, run in runs.items():  # interleaved: load drifts hit all alike
                gc.collect()
                cpu = run(base / f"{round}-{len(best)}-{run.__name__}.db", ids, reducer)
                best[name] = min(best.get(name, cpu), cpu)
    us = {name: cpu / len(ids) * 1e6 for name, cpu in best.items()}
    raw_us = us["raw sqlite3 RMW"]
    print_table(
        ["sequential send", "CPU µs/send", "rate vs raw"],
        [[name, v, raw_us / v] for name, v in us.items()],
        title=f"{len(ids):,} sends over {args.ids:,} ids, best of {args.rounds} (sending thread)",
    )


if __name__ == "__main__":
    main()
