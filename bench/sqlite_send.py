"""`send` throughput on a file SQLite store vs raw stdlib sqlite3, measured in the same run.

The raw baseline does what a hand-written app would: per send, BEGIN IMMEDIATE,
SELECT the JSON row, run the same reducer, UPDATE (or INSERT) it, COMMIT; same
pragmas (WAL, synchronous=NORMAL), same file system, same state sizes.

Cases
  hot       sequential sends to one id
  many      sequential sends round-robin over many ids
  threads   T threads sending to distinct ids (casern: group commit;
            raw: one connection per thread, BEGIN IMMEDIATE)
  listener  sequential sends over many ids with one no-op listener, timed
            until `app.drain()`; reports envelope writes per send (the outbox)

casern is measured as configured by default (history kept, written in the same
transaction) and with `history=False`, to show what the history table costs.

    python bench/sqlite_send.py                 # defaults, < 60 s
    python bench/sqlite_send.py --sends 20000 --ids 2000 --threads 8 --repeat 3
    python bench/sqlite_send.py --profile       # cProfile of the sequential case
    python bench/sqlite_send.py --otel          # what OpenTelemetry costs (no SDK, SDK)
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    dumps,
    make_reducer,
    now,
    print_table,
    python_info,
    ratio_line,
    raw_connect,
    raw_rmw,
    sqlite_url,
    temp_dir,
)

import casern

WARMUP = 50

#: (seconds, envelope writes per send, store transactions per send, CPU µs per send: every
#: thread of the process, `time.process_time`, steadier than rates on a shared machine)
Result = tuple[float, float, float, float]


def count_transactions(app: casern.Casern) -> list[int]:
    """Count `put_many` calls (one SQLite transaction each) of this app's store."""
    counter = [0]
    store = app.store
    put_many = store.put_many

    def counted(writes: Any) -> Any:
        counter[0] += 1
        return put_many(writes)

    store.put_many = counted  # type: ignore[method-assign]
    return counter


# -- raw baselines ----------------------------------------------------------------------------


def raw_sequential(
    path: Path, ids: list[str], reducer: Callable[..., Any], history: bool = False
) -> None:
    db = raw_connect(path)
    rmw = raw_rmw_history if history else raw_rmw
    if history:
        db.execute(
            "CREATE TABLE IF NOT EXISTS log (id TEXT NOT NULL, n INTEGER NOT NULL,"
            " entry TEXT NOT NULL, PRIMARY KEY (id, n)) WITHOUT ROWID"
        )
    try:
        for n in range(WARMUP):
            rmw(db, f"warm-{n % 5}", lambda s, n=n: reducer(None, s, {"i": n}))
        for i, id in enumerate(ids):
            rmw(db, id, lambda s, i=i: reducer(None, s, {"i": i}))
    finally:
        db.close()


def raw_rmw_history(
    db: sqlite3.Connection, id: str, reduce: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """`raw_rmw` plus what an app keeping an audit log would add: one history row per change,
    in the same transaction, keyed (id, n) as casern's (the like-for-like baseline); the
    `log` table is made by `raw_sequential`."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT rev, doc FROM kv WHERE id = ?", (id,)).fetchone()
        rev = 0 if row is None else row[0]
        state = reduce({} if row is None else json.loads(row[1]))
        if row is None:
            db.execute("INSERT INTO kv (id, rev, doc) VALUES (?, 1, ?)", (id, dumps(state)))
        else:
            db.execute(
                "UPDATE kv SET rev = ?, doc = ? WHERE id = ? AND rev = ?",
                (rev + 1, dumps(state), id, rev),
            )
        entry = {"n": rev + 1, "data": state.get("last"), "at": time.time()}
        db.execute("INSERT INTO log (id, n, entry) VALUES (?, ?, ?)", (id, rev + 1, dumps(entry)))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def raw_threads(
    path: Path, per_thread: list[list[str]], reducer: Callable[..., Any], shared: bool
) -> None:
    """Each thread its own connection (or one connection behind a lock, as casern's store)."""
    lock = threading.Lock()
    shared_db = raw_connect(path) if shared else None
    if shared_db is None:
        raw_connect(path).close()  # create the table before the threads race for it
    barrier = threading.Barrier(len(per_thread) + 1)
    errors: list[BaseException] = []

    def worker(ids: list[str]) -> None:
        db = shared_db or raw_connect(path)
        try:
            barrier.wait()
            for i, id in enumerate(ids):
                if shared:
                    with lock:
                        raw_rmw(db, id, lambda s, i=i: reducer(None, s, {"i": i}))
                else:
                    raw_rmw(db, id, lambda s, i=i: reducer(None, s, {"i": i}))
        except BaseException as e:
            errors.append(e)
        finally:
            if not shared:
                db.close()

    threads = [threading.Thread(target=worker, args=(ids,)) for ids in per_thread]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    if shared_db is not None:
        shared_db.close()
    if errors:
        raise errors[0]


# -- casern -----------------------------------------------------------------------------------


def make_app(
    path: Path, reducer: Callable[..., Any], *, history: bool = True, listener: bool = False
) -> casern.Casern:
    listeners = {"noop": lambda change: None} if listener else None
    app = casern.Casern(
        sqlite_url(path), reducers={"bump": reducer}, listeners=listeners, history=history
    )
    for n in range(WARMUP):
        app.send("bump", f"warm-{n % 5}", {"i": n})
    app.drain()
    return app


def casern_sequential(app: casern.Casern, ids: list[str]) -> None:
    send = app.send
    for i, id in enumerate(ids):
        send("bump", id, {"i": i})


def casern_threads(app: casern.Casern, per_thread: list[list[str]]) -> None:
    barrier = threading.Barrier(len(per_thread) + 1)
    errors: list[BaseException] = []

    def worker(ids: list[str]) -> None:
        try:
            barrier.wait()
            for i, id in enumerate(ids):
                app.send("bump", id, {"i": i})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ids,)) for ids in per_thread]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the cases --------------------------------------------------------------------------------


class Bench:
    """Fresh database files per run; variants of one case run interleaved, best kept."""

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.reducer = make_reducer(args.pad)
        self.counter = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.base / f"{self.counter:03d}-{name}.db"

    def interleaved(self, variants: dict[str, Callable[[], Result]]) -> dict[str, Result]:
        """Run every variant `repeat` times, round-robin (load drifts hit all alike)."""
        best: dict[str, Result] = {}
        for _ in range(max(1, self.args.repeat)):
            for name, run in variants.items():
                gc.collect()
                result = run()
                best[name] = min(best.get(name, result), result)
        return best

    def raw(self, ids: list[str], history: bool = False) -> Result:
        path = self.fresh("raw")
        start, cpu = now(), time.process_time()
        raw_sequential(path, ids, self.reducer, history)
        return now() - start, 1.0, 1.0, (time.process_time() - cpu) / len(ids) * 1e6

    def casern(self, ids: list[str], *, history: bool = True, listener: bool = False) -> Result:
        """Seconds (until drain if a listener), envelope writes and transactions per send."""
        with make_app(
            self.fresh("casern"), self.reducer, history=history, listener=listener
        ) as app:
            transactions = count_transactions(app)
            writes0 = app._engine.writes
            start, cpu = now(), time.process_time()
            casern_sequential(app, ids)
            if listener:
                app.drain()
            secs, cpu = now() - start, time.process_time() - cpu
            # Deferred acknowledgements land after a quiet `ack_delay`: count them too.
            app.drain()
            app._engine.stop()
            writes = (app._engine.writes - writes0) / len(ids)
            self._check(app, ids)
        return secs, writes, transactions[0] / len(ids), cpu / len(ids) * 1e6

    def _check(self, app: casern.Casern, ids: list[str]) -> None:
        """Honesty: every send landed (the counters add up to the number of sends)."""
        total = sum((app.get(id) or {}).get("n", 0) for id in set(ids))
        if total != len(ids):
            raise SystemExit(f"casern lost sends: {total} != {len(ids)}")

    def raw_threads(self, per_thread: list[list[str]], shared: bool) -> Result:
        path = self.fresh("rawt")
        start, cpu = now(), time.process_time()
        raw_threads(path, per_thread, self.reducer, shared)
        n = sum(len(ids) for ids in per_thread)
        return now() - start, 1.0, 1.0, (time.process_time() - cpu) / n * 1e6

    def casern_threads(self, per_thread: list[list[str]]) -> Result:
        with make_app(self.fresh("casernt"), self.reducer) as app:
            transactions = count_transactions(app)
            writes0, start, cpu = app._engine.writes, now(), time.process_time()
            casern_threads(app, per_thread)
            secs, cpu = now() - start, time.process_time() - cpu
            ids = [id for ids in per_thread for id in ids]
            writes = (app._engine.writes - writes0) / len(ids)
            self._check(app, ids)
        return secs, writes, transactions[0] / len(ids), cpu / len(ids) * 1e6


def breakdown(args: argparse.Namespace, base: Path) -> None:
    """Where a sequential send's time goes, layer by layer (µs per send, best of repeats).

    Uses engine internals (`Action`, `Engine._process`) on purpose: it runs the
    committer's work inline, in the caller's thread, to separate the engine's
    own CPU from the thread hand-off.
    """
    from casern._actions import SEND, Action
    from casern.stores.base import Write

    reducer = make_reducer(args.pad)
    ids = [f"m{i % args.ids:06d}" for i in range(args.sends)]
    n = len(ids)
    entry = {"reducer": "bump", "data": {"i": 0}, "key": None, "version": 1}
    entry["applied_at"] = "2025-01-01T00:00:00+00:00"

    def raw() -> float:
        start = now()
        raw_sequential(bench_path("raw"), ids, reducer)
        return now() - start

    def store_only(history: bool) -> float:
        app = make_app(bench_path("store"), reducer)
        store = app.store
        revs: dict[str, str | None] = {}
        docs = {id: {"state": reducer(None, {}, {"i": 0}), "seq": 0, "version": 1} for id in ids}
        start = now()
        for i, id in enumerate(ids):
            doc = dict(docs[id], seq=i)
            hist = [dict(entry, seq=i)] if history else []
            revs[id] = store.put_many([Write(id, revs.get(id), doc, hist)])[0]
        secs = now() - start
        app.close()
        return secs

    def engine_inline(history: bool) -> float:
        app = make_app(bench_path("inline"), reducer, history=history)
        engine = app._engine
        engine.stop()
        from concurrent.futures import Future

        start = now()
        for i, id in enumerate(ids):
            action = Action(SEND, id, Future(), "bump", f'{{"i":{i}}}', None)
            engine._process([action])
            action.future.result()
        secs = now() - start
        app.close()
        return secs

    def full(history: bool) -> float:
        with make_app(bench_path("send"), reducer, history=history) as app:
            start = now()
            casern_sequential(app, ids)
            return now() - start

    counter = [0]

    def bench_path(name: str) -> Path:
        counter[0] += 1
        return base / f"b{counter[0]:03d}-{name}.db"

    layers: dict[str, Callable[[], float]] = {
        "raw sqlite3 RMW (SELECT+UPDATE)": raw,
        "SQLiteStore.put_many, no history": lambda: store_only(False),
        "SQLiteStore.put_many + history row": lambda: store_only(True),
        "engine inline, history=False": lambda: engine_inline(False),
        "engine inline, history=True": lambda: engine_inline(True),
        "app.send, history=False": lambda: full(False),
        "app.send, history=True": lambda: full(True),
    }
    best: dict[str, float] = {}
    for _ in range(max(1, args.repeat)):
        for name, fn in layers.items():
            gc.collect()
            best[name] = min(best.get(name, float("inf")), fn())
    us = {name: secs / n * 1e6 for name, secs in best.items()}
    rows = [[name, v, v / us["raw sqlite3 RMW (SELECT+UPDATE)"]] for name, v in us.items()]
    print_table(
        ["layer (sequential, many ids)", "µs/send", "x raw"],
        rows,
        title=f"breakdown: {n:,} sends over {args.ids:,} ids, best of {args.repeat}",
    )
    put, put_h = us["SQLiteStore.put_many, no history"], us["SQLiteStore.put_many + history row"]
    inline_h, send_h = us["engine inline, history=True"], us["app.send, history=True"]
    print(
        f"\nengine CPU (inline - put_many): {inline_h - put_h:.0f} µs;"
        f" thread hand-off + validation (app.send - inline): {send_h - inline_h:.0f} µs;"
        f" history row in the store: {put_h - put:.0f} µs"
    )


def profile_sequential(args: argparse.Namespace, base: Path) -> None:
    """cProfile both the sending thread and the committer thread of the `many` case."""
    reducer = make_reducer(args.pad)
    ids = [f"m{i % args.ids:06d}" for i in range(args.sends)]
    app = casern.Casern(sqlite_url(base / "profile.db"), reducers={"bump": reducer})
    committer = cProfile.Profile()
    engine = app._engine
    run = engine._run

    def profiled_run() -> None:
        committer.runcall(run)

    engine._run = profiled_run  # type: ignore[method-assign]  # the thread starts on first submit
    for n in range(WARMUP):
        app.send("bump", f"warm-{n % 5}", {"i": n})
    caller = cProfile.Profile()
    start = now()
    caller.runcall(casern_sequential, app, ids)
    secs = now() - start
    app.close()  # stops the committer, which ends its profile
    print(
        f"\nprofile: {len(ids):,} sequential sends over {args.ids:,} ids"
        f" in {secs:.2f} s (under cProfile)"
    )
    for name, prof in (("caller thread (app.send)", caller), ("committer thread", committer)):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime")
        stats.print_stats(args.profile_top)
        print(f"\n=== {name}: top {args.profile_top} by own time ===")
        text = out.getvalue()
        print(text[text.find("   ncalls") :].rstrip())
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats("cumulative").print_stats(
            args.profile_top
        )
        print(f"\n=== {name}: top {args.profile_top} by cumulative time ===")
        text = out.getvalue()
        print(text[text.find("   ncalls") :].rstrip())


def otel_overhead(args: argparse.Namespace, base: Path) -> None:
    """Sequential sends with telemetry stubbed out, the API alone (no SDK) and an SDK."""
    import _otel

    bench = Bench(args, base)
    ids = [f"m{i % args.ids:06d}" for i in range(args.sends)]
    rows: list[list[Any]] = []
    for case, listener in (("many", False), ("listener", True)):
        best: dict[str, Result] = {}
        for round in range(max(1, args.repeat)):
            # Interleaved, and each round in another order: no mode always runs first.
            modes = _otel.MODES[round % 3 :] + _otel.MODES[: round % 3]
            for m in modes:
                gc.collect()
                with _otel.mode(m):
                    result = bench.casern(ids, listener=listener)
                best[m] = min(best.get(m, result), result)
        base_s = best["stubbed"][0]
        for m in _otel.MODES:
            secs = best[m][0]
            us = (secs - base_s) / len(ids) * 1e6
            rows.append([case, m, len(ids), len(ids) / secs, base_s / secs, us])
    print_table(
        ["case", "telemetry", "sends", "sends/s", "vs stubbed", "µs/send added"],
        rows,
        title=f"OpenTelemetry's cost, sequential sends over {args.ids:,} ids"
        f" (best of {args.repeat}, modes interleaved)",
    )
    print(f"\nmodes: {_otel.__doc__.split(chr(10), 2)[2].strip()}")
    stubbed_us = 1e6 / rows[0][3]  # the sequential "many" case, hooks stubbed out
    print(f"\nhooks timed alone (a sequential send, stubbed, took {stubbed_us:.0f} µs above):")
    shares = {}
    for m in ("api", "sdk"):
        send_us, deliver_us = _otel.hook_cost(m)
        shares[m] = send_us / stubbed_us
        print(
            f"  {m}: {send_us:.2f} µs per send ({100 * shares[m]:.1f}% of one),"
            f" {deliver_us:.2f} µs per listener call"
        )
    print(ratio_line("otel no-SDK hooks/send", shares["api"], "<= 0.05x"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sends", type=int, default=5_000, help="sends per case (default 5,000)")
    parser.add_argument(
        "--hot-sends", type=int, default=3_000, help="sends to the one hot id (default 3,000)"
    )
    parser.add_argument(
        "--ids", type=int, default=1_000, help="distinct ids for the many-ids cases (default 1,000)"
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="sending threads in the concurrent case (default 8)"
    )
    parser.add_argument(
        "--pad", type=int, default=200, help="bytes of padding in every state (default 200)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per measurement, best kept (default 2)"
    )
    parser.add_argument(
        "--dir", default=None, help="folder for the database files (default: system temp)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated cases to skip: hot,many,threads,listener"
    )
    parser.add_argument(
        "--profile", action="store_true", help="only profile the sequential many-ids case"
    )
    parser.add_argument(
        "--profile-top", type=int, default=25, help="rows per profile table (default 25)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="only time the layers of one sequential send"
    )
    parser.add_argument(
        "--otel", action="store_true", help="only compare telemetry off / no SDK / an SDK"
    )
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    print(f"casern bench: sqlite send vs raw sqlite3 — {python_info()}")
    with temp_dir(args.dir) as base:
        print(
            f"database files in {base} (WAL, synchronous=NORMAL),"
            f" state ≈ {args.pad + 40} bytes of JSON"
        )
        if args.breakdown:
            breakdown(args, base)
            return
        if args.otel:
            otel_overhead(args, base)
            return
        if args.profile:
            profile_sequential(args, base)
            return
        bench = Bench(args, base)
        rows: list[list[Any]] = []
        seq_ratios: list[float] = []

        def add(
            case: str,
            n: int,
            raw_s: float,
            what: str,
            secs: float,
            writes: float | str = "-",
            transactions: float | str = "-",
            cpu: float | str = "-",
        ) -> float:
            raw_rate, rate = n / raw_s, n / secs
            rows.append([case, what, n, raw_rate, rate, rate / raw_rate, writes, transactions, cpu])
            return rate / raw_rate

        if "hot" not in skip:
            ids = ["hot"] * args.hot_sends
            r = bench.interleaved(
                {
                    "raw": lambda: bench.raw(ids),
                    "casern": lambda: bench.casern(ids),
                    "nohist": lambda: bench.casern(ids, history=False),
                }
            )
            seq_ratios.append(add("hot: 1 id", len(ids), r["raw"][0], "casern", *r["casern"]))
            add("", len(ids), r["raw"][0], "casern history=False", *r["nohist"])
        if "many" not in skip:
            ids = [f"m{i % args.ids:06d}" for i in range(args.sends)]
            r = bench.interleaved(
                {
                    "raw": lambda: bench.raw(ids),
                    "rawh": lambda: bench.raw(ids, history=True),
                    "casern": lambda: bench.casern(ids),
                    "nohist": lambda: bench.casern(ids, history=False),
                }
            )
            seq_ratios.append(
                add(f"many: {args.ids:,} ids", len(ids), r["raw"][0], "casern", *r["casern"])
            )
            add("", len(ids), r["raw"][0], "casern history=False", *r["nohist"])
            add("", len(ids), r["raw"][0], "raw + a history row", *r["rawh"])
            like_ratio = add(
                "", len(ids), r["rawh"][0], "casern vs raw + history row", *r["casern"]
            )
        if "threads" not in skip:
            per = max(1, args.sends // args.threads)
            ids_per = max(1, args.ids // args.threads)
            per_thread = [
                [f"t{t}-{i % ids_per:06d}" for i in range(per)] for t in range(args.threads)
            ]
            n = per * args.threads
            r = bench.interleaved(
                {
                    "raw": lambda: bench.raw_threads(per_thread, shared=False),
                    "shared": lambda: bench.raw_threads(per_thread, shared=True),
                    "casern": lambda: bench.casern_threads(per_thread),
                }
            )
            thr_ratio = add(
                f"threads: {args.threads}", n, r["raw"][0], "casern (group commit)", *r["casern"]
            )
            add("", n, r["raw"][0], "raw, 1 shared conn + lock", *r["shared"])
        if "listener" not in skip:
            ids = [f"m{i % args.ids:06d}" for i in range(args.sends)]
            r = bench.interleaved(
                {
                    "raw": lambda: bench.raw(ids),
                    "casern": lambda: bench.casern(ids, listener=True),
                    "none": lambda: bench.casern(ids),
                }
            )
            lis_vs_none = r["none"][0] / r["casern"][0]
            lis_ratio = add(
                f"listener: {args.ids:,} ids",
                len(ids),
                r["raw"][0],
                "casern + 1 listener",
                *r["casern"],
            )
            add("", len(ids), r["raw"][0], "casern, no listener", *r["none"])

        print_table(
            [
                "case",
                "measured",
                "sends",
                "raw/s",
                "measured/s",
                "vs raw",
                "writes/send",
                "txn/send",
                "cpu µs/send",
            ],
            rows,
            title=f"throughput (best of {args.repeat};"
            " 'vs raw' = measured/s ÷ raw/s of the same row)",
        )
        print(
            "\nraw: BEGIN IMMEDIATE; SELECT; reduce; UPDATE|INSERT; COMMIT per send."
            " casern default also writes one history row per change in the same transaction."
            "\nwrites/send: envelope writes that landed (incl. outbox acks);"
            " txn/send: store transactions (put_many calls) per send, < 1 means group commit;"
            " cpu: all threads."
        )
        if "threads" not in skip:
            print(ratio_line(f"threads({args.threads}) send/raw", thr_ratio, ">= 0.6x"))
        if seq_ratios:
            print(
                ratio_line("send/raw", min(seq_ratios), ">= 0.5x")
                + "  [sequential, worst of hot/many]"
            )
        if "listener" not in skip:
            print(ratio_line("listener send/raw", lis_ratio, ">= 0.25x"))
            print(
                ratio_line("listener send/no-listener send", lis_vs_none, ">= 0.6x")
                + "  [same ids, same run]"
            )
        if "many" not in skip:
            print(
                ratio_line("send/raw+history", like_ratio, "none set")
                + "  [casern's default writes a history row per change; so does this raw]"
            )


if __name__ == "__main__":
    main()
