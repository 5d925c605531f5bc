"""`send`/`asend` throughput on CouchDB vs raw HTTP read-modify-write, same server, same run.

Baselines (bench/couch_raw.py, httpx, documents shaped like the bench state):
  sequential   per document GET + PUT, one at a time (one id, or round-robin)
  concurrent   per document GET + PUT with 50 workers, each doing a document's
               updates one after another: threads sharing an httpx.Client, and
               asyncio tasks sharing an httpx.AsyncClient; the better one counts

casern:
  sequential   `app.send` to one id N times, and round-robin over a few ids,
               with history on (the default: on CouchDB the newest entries stay
               in the envelope's `log` and move to `<db>-history` every 50
               changes), with `history=False`, and with one no-op listener
               (timed until `app.drain()`: the outbox entry and its lazy
               acknowledgement are part of the cost)
  concurrent   C conversations x K `asend`s: each conversation awaits its sends
               one after another, all conversations at once (asyncio); the one
               committer thread group-commits whatever is queued

Every run checks the result (each document's counter equals its number of
sends), so the rates are for work that really landed. Store calls are counted
from outside (wrapping `app.store.get_many/put_many/put_history`), which gives
commits/s and the committer's average batch, and the committer's time split:
HTTP calls (wall and CPU) vs the rest (folding reducers into envelopes).

    python bench/couch_send.py                        # pouchdb-server in memory, < 90 s
    python bench/couch_send.py --couchdb http://admin:pw@127.0.0.1:5984
    python bench/couch_send.py --profile              # + cProfile of the committer thread
    python bench/couch_send.py --only concurrent --conversations 2000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import couch_raw
from _common import make_reducer, now, print_table, python_info, ratio_line

import casern

CLK = os.sysconf("SC_CLK_TCK")


# -- measuring from outside -------------------------------------------------------------------


def proc_cpu(pid: int | str, tid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK


class Meter:
    """Counts and times the store calls the engine makes (instance attributes shadow methods)."""

    def __init__(self, store: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.wall: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        # confirm and leaves: the verifying re-read and the fork read on a cluster
        for name in ("get_many", "put_many", "put_history", "confirm", "leaves"):
            setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            items = len(args[-1])  # ids, writes, or history entries
            if not items:  # no request is made (the engine asks with all ids cached)
                return fn(*args, **kwargs)
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - w
                self.cpu[name] += time.thread_time() - c
                self.calls[name] += 1
                self.items[name] += items

        return wrapper

    def reset(self) -> None:
        for c in (self.calls, self.items, self.wall, self.cpu):
            c.clear()

    def snapshot(self) -> Meter:
        """A frozen copy (take it before reading the results back for checking)."""
        copy = object.__new__(Meter)
        copy.calls, copy.items = Counter(self.calls), Counter(self.items)
        copy.wall, copy.cpu = Counter(self.wall), Counter(self.cpu)
        return copy

    @property
    def requests(self) -> int:
        return sum(self.calls.values())


def committer_tid(app: casern.Casern) -> int | None:
    thread = app._engine._thread
    return None if thread is None else thread.native_id


class Clocks:
    """Wall, client process CPU, committer thread CPU and server CPU over a block."""

    def __init__(self, server_pid: int | None, app: casern.Casern | None = None) -> None:
        self.server_pid, self.app = server_pid, app

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        tid = committer_tid(self.app) if self.app else None
        server = proc_cpu(self.server_pid) if self.server_pid else float("nan")
        commit = proc_cpu("self", tid) if tid else float("nan")
        client = time.process_time()
        wall = now()
        yield out
        out["wall"] = now() - wall
        out["client_cpu"] = time.process_time() - client
        out["committer_cpu"] = proc_cpu("self", tid) - commit if tid else float("nan")
        out["server_cpu"] = proc_cpu(self.server_pid) - server if self.server_pid else float("nan")


def fresh_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/casern-bench-send-{uuid.uuid4().hex[:12]}"


def make_app(base_url: str, pad: int, *, history: bool, listener: bool) -> casern.Casern:
    def noop(change: Any) -> None:
        return None

    return casern.Casern(
        fresh_url(base_url),
        reducers={"bump": make_reducer(pad)},
        listeners={"noop": noop} if listener else None,
        history=history,
    )


def check_counts(app: casern.Casern, expected: dict[str, int], label: str) -> None:
    """Every id's counter and seq equal its number of sends (read back from the server)."""
    got = app.store.get_many(list(expected))
    bad = [
        (id, n, got[id].doc["state"].get("n") if id in got else None)
        for id, n in expected.items()
        if id not in got or got[id].doc["state"].get("n") != n or got[id].doc["seq"] != n
    ]
    if bad:
        raise SystemExit(f"{label}: wrong final states (id, expected, got): {bad[:5]}")


# -- sequential ---------------------------------------------------------------------------------


VARIANTS = {
    "history (default)": {"history": True, "listener": False},
    "history=False": {"history": False, "listener": False},
    "1 listener": {"history": True, "listener": True},
}


def casern_sequential(
    base_url: str, ids: int, n: int, pad: int, variant: str, server_pid: int | None
) -> dict[str, Any]:
    app = make_app(base_url, pad, **VARIANTS[variant])
    try:
        meter = Meter(app.store)
        names = [f"seq-{i}" for i in range(ids)]
        for name in names:  # create them (and start the committer)
            app.send("bump", name, -1)
        app.drain()
        meter.reset()
        clocks = Clocks(server_pid, app)
        with clocks.measure() as t:
            for k in range(n):
                app.send("bump", names[k % ids], k)
            app.drain()
        meter = meter.snapshot()
        check_counts(
            app, {name: 1 + len(range(i, n, ids)) for i, name in enumerate(names)}, variant
        )
        writes = meter.items["put_many"]
        return {
            "rate": n / t["wall"],
            "requests/send": meter.requests / n,
            "writes/send": writes / n,
            "history": meter.calls["put_history"],
            "reads": meter.calls["get_many"],
            **t,
        }
    finally:
        app.close()


def run_sequential(base_url: str, args: argparse.Namespace, server_pid: int | None) -> None:
    print(
        f"\n== sequential: {args.n} sends, one id and round-robin over {args.ids} ids;"
        f" best of {args.repeat}, raw and casern interleaved =="
    )
    couch_raw.rmw_round_robin_httpx(base_url, 1, 30, args.pad)  # warm up
    rows = []
    ratios = []
    for ids in (1, args.ids):
        # pouchdb-server in memory drifts (it keeps every revision): interleave the
        # raw and casern runs and keep the best of each.
        raws: list[float] = []
        best: dict[str, dict[str, Any]] = {}
        for _ in range(max(1, args.repeat)):
            raws.append(couch_raw.rmw_round_robin_httpx(base_url, ids, args.n, args.pad))
            for variant in VARIANTS:
                r = casern_sequential(base_url, ids, args.n, args.pad, variant, server_pid)
                if variant not in best or r["rate"] > best[variant]["rate"]:
                    best[variant] = r
        raw = max(raws)
        print(f"  {ids} id(s): raw {' / '.join(f'{x:.0f}' for x in raws)} RMW/s", flush=True)
        rows.append([f"raw GET+PUT httpx, {ids} id(s)", ids, raw, 1.0, 2.0, "", "", ""])
        for variant, r in best.items():
            rows.append(
                [
                    f"casern send, {variant}",
                    ids,
                    r["rate"],
                    r["rate"] / raw,
                    r["requests/send"],
                    r["writes/send"],
                    r["reads"],
                    r["history"],
                ]
            )
            ratios.append((f"sequential {ids} id(s), {variant}", r["rate"] / raw))
    print_table(
        [
            "case",
            "ids",
            "sends/s",
            "vs raw",
            "requests/send",
            "writes/send",
            "get_many",
            "put_history",
        ],
        rows,
        title=f"sequential sends ({args.n} per row, state pad {args.pad} B)",
    )
    for name, value in ratios:
        print(ratio_line(name, value, ">= 1.5x"))


# -- concurrent ---------------------------------------------------------------------------------


async def conversations(app: casern.Casern, prefix: str, count: int, per: int) -> list[Any]:
    async def one(i: int) -> Any:
        state = None
        for k in range(per):
            state = await app.asend("bump", f"{prefix}-{i:06d}", k)
        return state

    return await asyncio.gather(*(one(i) for i in range(count)))


def casern_concurrent(
    base_url: str, args: argparse.Namespace, server_pid: int | None, profile: bool
) -> dict[str, Any]:
    app = make_app(base_url, args.pad, history=True, listener=False)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        engine = app._engine
        run = engine._run

        def profiled() -> None:
            prof.enable()
            try:
                run()
            finally:
                prof.disable()

        engine._run = profiled  # type: ignore[method-assign]
    try:
        meter = Meter(app.store)
        count, per = args.conversations, args.per
        # Warm up: start the committer, open connections.
        asyncio.run(conversations(app, "warm", min(100, count), 2))
        app.drain()
        meter.reset()
        clocks = Clocks(server_pid, app)

        async def main() -> tuple[list[Any], float]:
            lag = 0.0  # how late the event loop wakes up: is it the bottleneck?

            async def probe() -> None:
                nonlocal lag
                while True:
                    t = now()
                    await asyncio.sleep(0.01)
                    lag = max(lag, now() - t - 0.01)

            task = asyncio.create_task(probe())
            try:
                return await conversations(app, "conv", count, per), lag
            finally:
                task.cancel()

        with clocks.measure() as t:
            states, lag = asyncio.run(main())
        meter = meter.snapshot()
        if any(s is None or s.get("n") != per for s in states):
            raise SystemExit("concurrent: an asend returned a wrong state")
        check_counts(app, {f"conv-{i:06d}": per for i in range(count)}, "concurrent")
        sends = count * per
        writes = meter.items["put_many"]
        out = {
            "sends": sends,
            "rate": sends / t["wall"],
            "commits/s": writes / t["wall"],
            "writes": writes,
            "put_many": meter.calls["put_many"],
            "batch": writes / max(1, meter.calls["put_many"]),
            "get_many": meter.calls["get_many"],
            "ids read": meter.items["get_many"],
            "put_history": meter.calls["put_history"],
            "loop lag": lag,
            "wall_split": dict(meter.wall),
            "cpu_split": dict(meter.cpu),
            **t,
        }
    finally:
        app.close()
    if prof is not None:
        out["profile"] = prof
    return out


def print_split(r: dict[str, Any]) -> None:
    wall = r["wall"]
    http_wall = sum(r["wall_split"].values())
    http_cpu = sum(r["cpu_split"].values())
    committer_cpu = r["committer_cpu"]
    rows = [
        [
            name,
            r["wall_split"].get(name, 0.0),
            r["cpu_split"].get(name, 0.0),
            r["wall_split"].get(name, 0.0) - r["cpu_split"].get(name, 0.0),
        ]
        for name in ("get_many", "put_many", "put_history")
    ]
    rows.append(["committer, outside store calls", wall - http_wall, committer_cpu - http_cpu, ""])
    print_table(
        ["committer thread", "wall s", "CPU s", "waiting s"],
        rows,
        title=f"where the committer's {wall:.2f} s went (waiting = wall - CPU inside HTTP calls)",
    )
    print(
        f"process CPU {r['client_cpu']:.2f} s (committer {committer_cpu:.2f} s, other threads"
        f" {r['client_cpu'] - committer_cpu:.2f} s), server CPU {r['server_cpu']:.2f} s,"
        f" over {wall:.2f} s wall; max event-loop lag {r['loop lag'] * 1e3:.0f} ms"
    )


def print_profile(prof: cProfile.Profile, limit: int) -> None:
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(limit)
        text = s.getvalue()
        start = text.find("   ncalls")
        print(f"\n-- cProfile of the committer thread, by {key} --")
        print(text[start:].rstrip() if start >= 0 else text)


def run_concurrent(base_url: str, args: argparse.Namespace, server_pid: int | None) -> None:
    count, per, workers = args.conversations, args.per, args.workers
    raw_docs = args.raw_docs
    print(
        f"\n== concurrent: {count:,} conversations x {per} asends;"
        f" raw: {raw_docs} docs x {per} updates, {workers} workers =="
    )
    couch_raw.rmw_concurrent_threads(base_url, workers, 2, workers, args.pad)  # warm up
    threads = couch_raw.rmw_concurrent_threads(base_url, raw_docs, per, workers, args.pad)
    print(f"  raw threads: {threads:.0f} updates/s", flush=True)
    aio = couch_raw.rmw_concurrent_async(base_url, raw_docs, per, workers, args.pad)
    print(f"  raw asyncio: {aio:.0f} updates/s", flush=True)
    best_name, best = max(
        [("threads + httpx.Client", threads), ("asyncio + httpx.AsyncClient", aio)],
        key=lambda x: x[1],
    )
    r = casern_concurrent(base_url, args, server_pid, profile=False)
    print(f"  casern: {r['rate']:.0f} sends/s", flush=True)
    rows = [
        [f"raw GET+PUT, {workers} threads + httpx.Client", threads, threads, 1.0, "", ""],
        [f"raw GET+PUT, {workers} tasks + httpx.AsyncClient", aio, aio, 1.0, "", ""],
        [
            f"casern asend, {count:,} x {per}",
            r["rate"],
            r["commits/s"],
            r["batch"],
            r["get_many"],
            r["ids read"],
        ],
    ]
    print_table(
        ["case", "sends/s", "commits/s", "avg batch", "get_many", "ids read"],
        rows,
        title=f"concurrent sends (state pad {args.pad} B); raw baseline = {best_name}",
    )
    print(
        f"casern: {r['sends']:,} sends in {r['wall']:.2f} s -> {r['writes']:,} envelope writes"
        f" in {r['put_many']} put_many calls ({r['sends'] / r['writes']:.2f} sends folded"
        f" per write), {r['put_history']} put_history calls"
    )
    print_split(r)
    print(ratio_line(f"concurrent asend vs raw ({best_name})", r["rate"] / best, ">= 5x"))
    if args.profile:
        p = casern_concurrent(base_url, args, server_pid, profile=True)
        print(f"\nprofiled run (cProfile slows the committer): {p['rate']:.0f} sends/s")
        print_profile(p["profile"], args.profile_lines)


# -- main -----------------------------------------------------------------------------------------


def run(base_url: str, args: argparse.Namespace, server_pid: int | None) -> None:
    if args.only in (None, "sequential"):
        run_sequential(base_url, args, server_pid)
    if args.only in (None, "concurrent"):
        run_concurrent(base_url, args, server_pid)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--couchdb",
        default=os.environ.get("CASERN_COUCHDB_URL"),
        help="server base URL (no database); default: start pouchdb-server in memory",
    )
    parser.add_argument("--n", type=int, default=200, help="sequential sends per row")
    parser.add_argument("--repeat", type=int, default=2, help="sequential runs per row (best)")
    parser.add_argument("--ids", type=int, default=4, help="ids for the round-robin rows")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--per", type=int, default=10, help="asends per conversation")
    parser.add_argument("--workers", type=int, default=50, help="raw concurrent workers")
    parser.add_argument(
        "--raw-docs", type=int, default=100, help="documents for the raw concurrent baseline"
    )
    parser.add_argument("--pad", type=int, default=100, help="bytes of padding in the state")
    parser.add_argument("--only", choices=["sequential", "concurrent"], default=None)
    parser.add_argument(
        "--profile", action="store_true", help="also a cProfile'd concurrent run (committer)"
    )
    parser.add_argument("--profile-lines", type=int, default=25)
    args = parser.parse_args()

    print(f"casern bench: CouchDB send vs raw HTTP — {python_info()}")
    start = now()
    if args.couchdb:
        print(f"server: {args.couchdb.rpartition('@')[2]} (server CPU not measured)")
        run(args.couchdb, args, None)
    else:
        from _couch import PouchServer

        with PouchServer(in_memory=True) as server:
            pid = server._proc.pid if server._proc else None
            print(f"server: pouchdb-server in memory at {server.base_url} (pid {pid})")
            run(server.base_url, args, pid)
    print(f"\ntotal {now() - start:.1f} s; threads alive: {threading.active_count()}")


if __name__ == "__main__":
    main()
