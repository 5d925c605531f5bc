"""Memory: RSS growth while sending to very many distinct ids (SQLite file in a temp dir).

Each variant runs in its own child process, so one variant's freed-but-kept
memory cannot hide or inflate another's:

  raw       the raw baseline: stdlib sqlite3 read-modify-write of one JSON row per id
  casern    `app.send` to N distinct ids
  listener  the same with one no-op listener (outbox, dispatcher lanes, acks)

RSS (VmRSS) is sampled before the first timed send (after a warm-up), at every
fifth of the run, after `app.drain()` and after a final `gc.collect()`.

    python bench/memory.py                     # 100,000 ids (30,000 with a listener), < 2 min
    python bench/memory.py --listener-ids 100000 --variants listener
    python bench/memory.py --ids 20000 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from _common import (
    make_reducer,
    now,
    print_table,
    python_info,
    raw_connect,
    raw_rmw,
    rss_mb,
    sqlite_url,
    temp_dir,
)

import casern

VARIANTS = ("raw", "casern", "listener")


def child(variant: str, ids: int, threads: int, pad: int, base: Path) -> dict[str, Any]:
    """Run one variant in this process; return RSS samples (MB) and timings."""
    reducer = make_reducer(pad)
    path = base / f"{variant}.db"
    samples: list[tuple[str, float]] = []
    app: casern.Casern | None = None
    if variant == "raw":
        db = raw_connect(path)
        lock = threading.Lock()

        def send(id: str, i: int) -> None:
            with lock:
                raw_rmw(db, id, lambda s: reducer(None, s, {"i": i}))

    else:
        listeners = {"noop": lambda change: None} if variant == "listener" else None
        app = casern.Casern(sqlite_url(path), reducers={"bump": reducer}, listeners=listeners)

        def send(id: str, i: int) -> None:
            assert app is not None
            app.send("bump", id, {"i": i})

    for i in range(200):  # warm-up: imports, threads, caches, statement cache
        send(f"warm-{i}", i)
    if app is not None:
        app.drain()
    gc.collect()
    start_rss = rss_mb()
    samples.append(("start", start_rss))
    checkpoints = {ids * k // 5 for k in range(1, 6)}
    done = [0]
    done_lock = threading.Lock()
    start = now()

    def worker(t: int) -> None:
        for i in range(t, ids, threads):
            send(f"machine-{i:08d}", i)
            with done_lock:
                done[0] += 1
                if done[0] in checkpoints:
                    samples.append((f"{done[0]:,} sent", rss_mb()))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    secs = now() - start
    if app is not None:
        app.drain()
        samples.append(("after drain()", rss_mb()))
    gc.collect()
    samples.append(("after gc", rss_mb()))
    if app is not None:
        state = app.get(f"machine-{ids - 1:08d}")
        assert state is not None and state["n"] == 1, state
        app.close()
    else:
        db.close()
    return {"variant": variant, "ids": ids, "seconds": secs, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ids", type=int, default=100_000, help="distinct ids (default 100,000)")
    parser.add_argument(
        "--listener-ids",
        type=int,
        default=30_000,
        help="distinct ids for the listener variant (default 30,000: it is ~4x slower;"
        " pass 100000 for the full run, ~2 min alone)",
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="sending threads (default 4: group commit)"
    )
    parser.add_argument("--pad", type=int, default=200, help="bytes of padding per state")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--dir", default=None, help="folder for the database files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child(args.child, args.ids, args.threads, args.pad, Path(args.dir))
        print("RESULT " + json.dumps(result))
        return

    print(f"casern bench: memory — {python_info()}")
    print(
        f"{args.ids:,} distinct ids ({min(args.ids, args.listener_ids):,} with the listener),"
        f" {args.threads} sending thread(s), each variant in a child process"
    )
    results: dict[str, dict[str, Any]] = {}
    with temp_dir(args.dir) as base:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
            command = [sys.executable, __file__, "--child", variant, "--dir", str(base)]
            ids = min(args.ids, args.listener_ids) if variant == "listener" else args.ids
            command += ["--ids", str(ids), "--threads", str(args.threads)]
            command += ["--pad", str(args.pad)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            results[variant] = json.loads(line[len("RESULT ") :])
            r = results[variant]
            print(f"  {variant}: {ids:,} sends in {r['seconds']:.1f} s", flush=True)

    for variant, r in results.items():
        start = r["samples"][0][1]
        rows = [[label, mb, mb - start] for label, mb in r["samples"]]
        print_table(
            ["point", "RSS MB", "growth MB"],
            rows,
            title=f"{variant}: {r['ids']:,} ids, {r['ids'] / r['seconds']:,.0f} sends/s",
        )
    print()
    for variant, r in results.items():
        start = r["samples"][0][1]
        peak = max(mb for _, mb in r["samples"]) - start
        end = r["samples"][-1][1] - start
        goal = "(baseline)" if variant == "raw" else "(goal <= 50 MB)"
        print(f"RSS growth {variant} = peak {peak:.1f} MB, final {end:.1f} MB {goal}")


if __name__ == "__main__":
    main()
