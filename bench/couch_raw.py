"""Raw CouchDB read-modify-write rates: the ceiling the CouchDB store works under.

    python bench/couch_raw.py [--n 500] [--docs 5000] [--batch 500] [--url http://127.0.0.1:5984]

Without --url (or CASERN_COUCHDB_URL) it starts its own pouchdb-server on
loopback (tests/_couch.py). Every function takes a base URL (no database),
works in a fresh database and returns documents per second, so later benches
can reuse them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _couch import couchdb_server  # noqa: E402
from casern.stores.base import Write  # noqa: E402
from casern.stores.couchdb import CouchDBStore  # noqa: E402

HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}


def _client(base_url: str, limits: httpx.Limits | None = None) -> httpx.Client:
    parts = urlsplit(base_url)
    auth = (parts.username or "", parts.password or "") if parts.username else None
    plain = base_url.replace(f"{parts.username}:{parts.password}@", "") if auth else base_url
    extra: dict[str, Any] = {} if limits is None else {"limits": limits}
    return httpx.Client(base_url=plain, headers=HEADERS, auth=auth, timeout=30.0, **extra)


def _fresh_db(client: httpx.Client) -> str:
    name = f"bench-{uuid.uuid4().hex}"
    client.put(f"/{name}").raise_for_status()
    return name


def _drop_db(client: httpx.Client, name: str) -> None:
    client.delete(f"/{name}")


def rmw_sequential_httpx(base_url: str, n: int = 500) -> float:
    """GET + PUT of one document at a time, httpx.Client keep-alive: docs/s."""
    with _client(base_url) as c:
        db = _fresh_db(c)
        try:
            for i in range(n):
                c.put(f"/{db}/d{i}", content=json.dumps({"n": 0})).raise_for_status()
            t0 = time.perf_counter()
            for i in range(n):
                doc = c.get(f"/{db}/d{i}").json()
                doc["n"] += 1
                c.put(f"/{db}/d{i}", content=json.dumps(doc)).raise_for_status()
            return n / (time.perf_counter() - t0)
        finally:
            _drop_db(c, db)


def rmw_sequential_http_client(base_url: str, n: int = 500) -> float:
    """The same with stdlib http.client on one keep-alive connection: docs/s."""
    parts = urlsplit(base_url)
    headers = dict(HEADERS)
    if parts.username:
        import base64

        token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 5984, timeout=30)
    prefix = parts.path.rstrip("/")

    def call(method: str, path: str, body: Any = None) -> Any:
        conn.request(method, prefix + path, None if body is None else json.dumps(body), headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status >= 400 and not (method == "DELETE" and resp.status == 404):
            raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
        return json.loads(data)

    db = f"bench-{uuid.uuid4().hex}"
    call("PUT", f"/{db}")
    try:
        for i in range(n):
            call("PUT", f"/{db}/d{i}", {"n": 0})
        t0 = time.perf_counter()
        for i in range(n):
            doc = call("GET", f"/{db}/d{i}")
            doc["n"] += 1
            call("PUT", f"/{db}/d{i}", doc)
        return n / (time.perf_counter() - t0)
    finally:
        call("DELETE", f"/{db}")
        conn.close()


def rmw_bulk(base_url: str, docs: int = 5000, batch: int = 500) -> float:
    """`_all_docs?keys` + `_bulk_docs` read-modify-write in batches: docs/s."""
    with _client(base_url) as c:
        db = _fresh_db(c)
        try:
            ids = [f"d{i}" for i in range(docs)]
            for s in range(0, docs, batch):
                body = {"docs": [{"_id": i, "n": 0} for i in ids[s : s + batch]]}
                c.post(f"/{db}/_bulk_docs", content=json.dumps(body)).raise_for_status()
            t0 = time.perf_counter()
            for s in range(0, docs, batch):
                keys = ids[s : s + batch]
                rows = c.post(
                    f"/{db}/_all_docs",
                    params={"include_docs": "true"},
                    content=json.dumps({"keys": keys}),
                ).json()["rows"]
                out = []
                for row in rows:
                    doc = row["doc"]
                    doc["n"] += 1
                    out.append(doc)
                resp = c.post(f"/{db}/_bulk_docs", content=json.dumps({"docs": out}))
                resp.raise_for_status()
                assert all("rev" in r for r in resp.json())
            return docs / (time.perf_counter() - t0)
        finally:
            _drop_db(c, db)


def store_rmw_sequential(base_url: str, n: int = 500) -> float:
    """CouchDBStore.get + put_many of one write at a time: docs/s."""
    store = CouchDBStore(f"{base_url.rstrip('/')}/bench-{uuid.uuid4().hex}")
    try:
        store.put_many([Write(f"d{i}", None, {"n": 0}) for i in range(n)])
        t0 = time.perf_counter()
        for i in range(n):
            rec = store.get(f"d{i}")
            assert rec is not None
            [rev] = store.put_many([Write(rec.id, rec.rev, {"n": rec.doc["n"] + 1})])
            assert rev
        return n / (time.perf_counter() - t0)
    finally:
        store.close()


def store_rmw_bulk(base_url: str, docs: int = 5000, batch: int = 500) -> float:
    """CouchDBStore.get_many + put_many in batches: docs/s."""
    store = CouchDBStore(f"{base_url.rstrip('/')}/bench-{uuid.uuid4().hex}")
    try:
        ids = [f"d{i}" for i in range(docs)]
        store.put_many([Write(i, None, {"n": 0}) for i in ids])
        t0 = time.perf_counter()
        for s in range(0, docs, batch):
            recs = store.get_many(ids[s : s + batch])
            revs = store.put_many(
                [Write(r.id, r.rev, {"n": r.doc["n"] + 1}) for r in recs.values()]
            )
            assert all(revs)
        return docs / (time.perf_counter() - t0)
    finally:
        store.close()


def rmw_round_robin_httpx(base_url: str, ids: int = 1, n: int = 500, pad: int = 0) -> float:
    """GET + PUT round-robin over `ids` documents, one at a time (httpx.Client): docs/s.

    The documents look like the bench reducer's state: {"n", "last", "pad"}.
    Verifies that every update landed.
    """
    with _client(base_url) as c:
        db = _fresh_db(c)
        try:
            names = [f"d{i}" for i in range(ids)]
            for name in names:
                body = {"n": 0, "last": None, "pad": "x" * pad}
                c.put(f"/{db}/{name}", content=json.dumps(body)).raise_for_status()
            t0 = time.perf_counter()
            for k in range(n):
                name = names[k % ids]
                doc = c.get(f"/{db}/{name}").json()
                doc["n"] += 1
                doc["last"] = k
                c.put(f"/{db}/{name}", content=json.dumps(doc)).raise_for_status()
            rate = n / (time.perf_counter() - t0)
            _check_counts(c, db, {name: len(range(i, n, ids)) for i, name in enumerate(names)})
            return rate
        finally:
            _drop_db(c, db)


def _check_counts(c: httpx.Client, db: str, expected: dict[str, int]) -> None:
    rows = c.post(
        f"/{db}/_all_docs",
        params={"include_docs": "true"},
        content=json.dumps({"keys": list(expected)}),
    ).json()["rows"]
    got = {r["id"]: r["doc"]["n"] for r in rows if isinstance(r.get("doc"), dict)}
    if got != expected:
        bad = [k for k in expected if got.get(k) != expected[k]][:3]
        raise RuntimeError(f"raw RMW lost updates: {[(k, got.get(k), expected[k]) for k in bad]}")


def rmw_concurrent_threads(
    base_url: str, docs: int = 150, per_doc: int = 10, workers: int = 50, pad: int = 0
) -> float:
    """`workers` threads sharing one httpx.Client; each takes a document and does
    `per_doc` GET+PUT updates on it one after another: updates/s."""
    import queue
    import threading

    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with _client(base_url, limits=limits) as c:
        db = _fresh_db(c)
        try:
            names = [f"d{i}" for i in range(docs)]
            _create_docs(c, db, names, pad)
            todo: queue.SimpleQueue[str] = queue.SimpleQueue()
            for name in names:
                todo.put(name)
            failures: list[BaseException] = []

            def work() -> None:
                try:
                    while True:
                        try:
                            name = todo.get_nowait()
                        except queue.Empty:
                            return
                        for k in range(per_doc):
                            doc = c.get(f"/{db}/{name}").json()
                            doc["n"] += 1
                            doc["last"] = k
                            c.put(f"/{db}/{name}", content=json.dumps(doc)).raise_for_status()
                except BaseException as e:  # reported below
                    failures.append(e)

            threads = [threading.Thread(target=work) for _ in range(workers)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rate = docs * per_doc / (time.perf_counter() - t0)
            if failures:
                raise failures[0]
            _check_counts(c, db, dict.fromkeys(names, per_doc))
            return rate
        finally:
            _drop_db(c, db)


def rmw_concurrent_async(
    base_url: str, docs: int = 150, per_doc: int = 10, workers: int = 50, pad: int = 0
) -> float:
    """The same with `workers` asyncio tasks sharing one httpx.AsyncClient: updates/s."""
    import asyncio

    parts = urlsplit(base_url)
    auth = (parts.username or "", parts.password or "") if parts.username else None
    plain = base_url.replace(f"{parts.username}:{parts.password}@", "") if auth else base_url
    names = [f"d{i}" for i in range(docs)]
    with _client(base_url) as c:
        db = _fresh_db(c)
        try:
            _create_docs(c, db, names, pad)

            async def main() -> float:
                limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
                async with httpx.AsyncClient(
                    base_url=plain, headers=HEADERS, auth=auth, timeout=30.0, limits=limits
                ) as ac:
                    todo: asyncio.Queue[str] = asyncio.Queue()
                    for name in names:
                        todo.put_nowait(name)

                    async def work() -> None:
                        while not todo.empty():
                            name = todo.get_nowait()
                            for k in range(per_doc):
                                doc = (await ac.get(f"/{db}/{name}")).json()
                                doc["n"] += 1
                                doc["last"] = k
                                r = await ac.put(f"/{db}/{name}", content=json.dumps(doc))
                                r.raise_for_status()

                    t0 = time.perf_counter()
                    await asyncio.gather(*(work() for _ in range(workers)))
                    return docs * per_doc / (time.perf_counter() - t0)

            rate = asyncio.run(main())
            _check_counts(c, db, dict.fromkeys(names, per_doc))
            return rate
        finally:
            _drop_db(c, db)


def _create_docs(c: httpx.Client, db: str, names: list[str], pad: int) -> None:
    for s in range(0, len(names), 500):
        body = {
            "docs": [{"_id": n, "n": 0, "last": None, "pad": "x" * pad} for n in names[s : s + 500]]
        }
        c.post(f"/{db}/_bulk_docs", content=json.dumps(body)).raise_for_status()


def run(base_url: str, n: int, docs: int, batch: int) -> dict[str, float]:
    benches: list[tuple[str, Callable[[], float]]] = [
        ("raw GET+PUT sequential, httpx.Client", lambda: rmw_sequential_httpx(base_url, n)),
        ("raw GET+PUT sequential, http.client", lambda: rmw_sequential_http_client(base_url, n)),
        (f"raw _all_docs+_bulk_docs, batch {batch}", lambda: rmw_bulk(base_url, docs, batch)),
        ("CouchDBStore get+put_many, 1 doc", lambda: store_rmw_sequential(base_url, n)),
        (
            f"CouchDBStore get_many+put_many, batch {batch}",
            lambda: store_rmw_bulk(base_url, docs, batch),
        ),
    ]
    results = {}
    for name, fn in benches:
        fn()  # warm up (JIT, connections), then measure
        rate = fn()
        results[name] = rate
        print(f"{name:48s} {rate:9.0f} docs/s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--url", default=os.environ.get("CASERN_COUCHDB_URL"))
    ap.add_argument("--n", type=int, default=500, help="docs for the sequential benches")
    ap.add_argument("--docs", type=int, default=5000, help="docs for the batched benches")
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    if args.url:
        run(args.url, args.n, args.docs, args.batch)
    else:
        with couchdb_server() as url:
            print(f"pouchdb-server (in memory) at {url}")
            run(url, args.n, args.docs, args.batch)


if __name__ == "__main__":
    main()
