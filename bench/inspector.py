"""Inspector page times with 100,000 machines vs 1,000, on SQLite and CouchDB.

The store is populated fast (as bench/tick.py does: every machine a `wake`
timer), then one machine gets 20 changes through `send`, so its page has a
timeline. The inspector is served by uvicorn on a free loopback port, and each
page is fetched over HTTP (httpx, keep-alive) `--repeat` times, the stores
taking turns request by request (a noisy moment hits both alike); the median is
printed. The raw baseline, in the same run, is the public call the page is
built on (`app.ids(limit=51)`, `app.inspect(id)` + `app.history(id)`) timed
in-process: the ratio is what the web layer (routing, templates, HTTP) adds.

The issue's goal: a page answers in < 200 ms with 100,000 machines; paging
reads one page of ids, never all, so 100,000 costs about what 1,000 costs.

    python bench/inspector.py                                  # SQLite + pouchdb-server
    python bench/inspector.py --couchdb http://admin:pw@127.0.0.1:5984
    python bench/inspector.py --sizes 1000,100000 --repeat 30 --no-couchdb
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
from _common import print_table, python_info, ratio_line, sqlite_url, temp_dir
from tick import Plan, next_wake, populate_couch, populate_sqlite, wake

import casern
import casern.inspector
from tests._couch import free_port

HISTORY = 20


def message(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**state, "messages": [*state.get("messages", []), data], "count": len(state) + 1}


class Target:
    """One store of `size` machines, its app, and the inspector served on a free port."""

    def __init__(self, url: str, size: int) -> None:
        self.size = size
        self.app = casern.Casern(
            url, reducers={"wake": wake, "message": message}, timers={"wake": next_wake}
        )
        self.one = Plan.id(size // 2)
        for n in range(HISTORY):
            self.app.send("message", self.one, {"n": n, "text": f"message {n}"})
        port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                casern.inspector.asgi(self.app), host="127.0.0.1", port=port, log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        middle = Plan.id(size // 3)
        app, one = self.app, self.one
        self.calls: dict[str, Callable[[], Any]] = {
            "raw ids": lambda: app.ids(limit=51),
            "raw machine": lambda: (app.inspect(one), app.history(one)),
            "list page": self.get("/"),
            "list page, middle": self.get(f"/?after={middle}"),
            "api ids": self.get("/api/machines?prefix=machine-0001"),
            "machine page": self.get(f"/machines/{one}"),
            "api machine": self.get(f"/api/machines/{one}"),
            "failed page": self.get("/failed"),
        }

    def get(self, path: str) -> Callable[[], None]:
        def go() -> None:
            r = self.client.get(path)
            if r.status_code != 200:
                raise SystemExit(f"GET {path}: {r.status_code} {r.text[:200]}")

        return go

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.app.close()


def measure(targets: list[Target], repeat: int) -> list[dict[str, Any]]:
    """Median ms of each call on each target, taken in turns (the same noise for all)."""
    times: dict[tuple[int, str], list[float]] = {}
    for round in range(repeat + 1):
        for target in targets:
            for name, fn in target.calls.items():
                start = time.perf_counter()
                fn()
                if round:  # round 0 warms: templates, connections, indexes
                    times.setdefault((target.size, name), []).append(time.perf_counter() - start)
    return [
        {"size": t.size, **{n: statistics.median(times[t.size, n]) * 1000 for n in t.calls}}
        for t in targets
    ]


def run(urls: list[tuple[str, int]], repeat: int) -> list[dict[str, Any]]:
    targets: list[Target] = []
    try:
        for url, size in urls:
            targets.append(Target(url, size))
        return measure(targets, repeat)
    finally:
        for t in targets:
            t.close()


COLUMNS = [
    "size",
    "raw ids",
    "list page",
    "list page, middle",
    "api ids",
    "raw machine",
    "machine page",
    "api machine",
    "failed page",
]


def report(kind: str, rows: list[dict[str, Any]]) -> None:
    print_table(
        [c if c == "size" else f"{c} ms" for c in COLUMNS],
        [[r[c] for c in COLUMNS] for r in rows],
        title=f"{kind}: median ms per request",
    )
    small, large = rows[0], rows[-1]
    worst = max(large[c] for c in COLUMNS if "page" in c or "api" in c)
    print(f"slowest page with {large['size']:,} machines: {worst:.1f} ms (goal < 200 ms)")
    print(
        ratio_line(
            f"{kind} list page {large['size']:,}/{small['size']:,}",
            large["list page"] / small["list page"],
            "~1x: one page, never a scan",
        )
    )
    print(
        ratio_line(
            f"{kind} list page / raw ids",
            large["list page"] / large["raw ids"],
            "what HTTP + templates add",
        )
    )
    print(
        ratio_line(
            f"{kind} machine page / raw calls",
            large["machine page"] / large["raw machine"],
            "what HTTP + templates add",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--couchdb", help="CouchDB base URL (default: pouchdb-server)")
    parser.add_argument("--no-couchdb", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(python_info())
    with temp_dir() as tmp:
        urls = []
        for size in sizes:
            path = tmp / f"inspector-{size}.db"
            seconds = populate_sqlite(path, Plan(size, 1, 1))
            print(f"  sqlite {size:,} machines populated in {seconds:.1f} s", flush=True)
            urls.append((sqlite_url(path), size))
        report("sqlite", run(urls, args.repeat))
    if args.no_couchdb:
        return

    def couch(base_url: str) -> None:
        urls = []
        for size in sizes:
            url = f"{base_url.rstrip('/')}/casern-bench-inspector-{size}-{uuid.uuid4().hex[:8]}"
            seconds = populate_couch(url, Plan(size, 1, 1))
            print(f"  couchdb {size:,} machines populated in {seconds:.1f} s", flush=True)
            urls.append((url, size))
        report("couchdb", run(urls, args.repeat))

    if args.couchdb:
        couch(args.couchdb)
    else:
        from tests._couch import couchdb_server

        with couchdb_server() as base_url:
            print(f"server: pouchdb-server in memory at {base_url}")
            couch(base_url)


if __name__ == "__main__":
    main()
