"""A healthy process delivers each change once, however far behind its listeners run.

Redelivery is for changes whose process died: a live process that committed a
change, or is delivering it, never delivers it again, even when the backlog is far
older than `redeliver_after` and the scheduler sweeps all the while.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable

import casern
from casern.stores.base import Write


def test_a_backlog_far_older_than_redeliver_after_is_delivered_exactly_once(
    make_app: Callable[..., casern.Casern],
) -> None:
    seen: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    async def slow(change: casern.Change) -> None:
        await asyncio.sleep(0.05)
        with lock:
            seen[(change.id, change.seq)] += 1

    # Sweeps every 20 ms look for changes pending longer than 50 ms: with 600
    # sends in a burst and lazy acknowledgements, most of them are, all the time.
    app = make_app(listeners={"slow": slow}, redeliver_after=0.05, tick=0.02)
    app.start()

    def sender(t: int) -> None:
        for n in range(150):
            app.send("inc", f"m{t}-{n % 100}", n)  # 100 ids each, 50 of them twice

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert app.drain(timeout=60)
    expected = {(f"m{t}-{n % 100}", 1 + n // 100) for t in range(4) for n in range(150)}
    assert set(seen) == expected
    assert [k for k, n in seen.items() if n > 1] == []
    assert all(not app.store.get(id).doc.get("pending") for id, _ in expected)  # type: ignore[union-attr]


def test_two_live_workers_redeliver_a_dead_process_change_once(
    make_app: Callable[..., casern.Casern],
) -> None:
    release = threading.Event()

    def stuck(change: casern.Change) -> None:
        release.wait(10)

    dead = make_app(listeners={"l": stuck})
    for i in range(30):
        dead.send("inc", f"d{i}")
    dead.close(timeout=0.1)  # its deliveries never finished: all 30 stay pending
    release.set()

    seen: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def count(change: casern.Change) -> None:
        with lock:
            seen[(change.id, change.seq)] += 1

    # A claim holds other workers off for redeliver_after: long enough for this test.
    time.sleep(0.5)
    workers = [make_app(listeners={"l": count}, redeliver_after=0.5) for _ in range(2)]

    def sweep(app: casern.Casern) -> None:
        for _ in range(5):
            app.run_once()

    threads = [threading.Thread(target=sweep, args=(w,)) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for w in workers:
        assert w.drain(timeout=30)
    assert seen == Counter({(f"d{i}", 1): 1 for i in range(30)})


def test_a_claim_by_another_worker_holds_until_its_lease_ends(
    make_app: Callable[..., casern.Casern],
) -> None:
    writer = make_app()
    writer.send("inc", "a")
    entry = dict(writer.history("a")[0], at=0.0, prev={}, state={"n": 1})
    seen: list[int] = []
    worker = make_app(listeners={"l": lambda c: seen.append(c.seq)}, redeliver_after=0.0)
    for until, expected in ((time.time() + 60, []), (time.time() - 1, [1])):
        rec = writer.store.get("a")
        assert rec is not None
        claim = {"by": "a worker that died", "until": until}
        doc = dict(rec.doc, pending=[dict(entry, claim=claim)], pending_since=0.0)
        assert writer.store.put_many([Write("a", rec.rev, doc, [])]) != [None]
        worker.run_once()
        assert worker.drain(timeout=10)
        assert seen == expected
