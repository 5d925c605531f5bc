"""CONTRACT.md, "Listeners": after the commit, per id in seq order, at least once."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC
from typing import Any

import casern


def test_a_listener_gets_the_whole_change_after_the_commit(make_app: Any) -> None:
    changes: list[casern.Change] = []
    stored: list[Any] = []
    app = make_app(
        listeners={"spy": lambda c: (changes.append(c), stored.append(app.get(c.id)))},
        preferences={"lang": "en"},
        services={"mailer": "the mailer"},
    )
    app.send("inc", "a", {"text": "hi"}, key="k-1")
    assert app.drain(10)
    (c,) = changes
    assert (c.id, c.reducer, c.data, c.key, c.seq) == ("a", "inc", {"text": "hi"}, "k-1", 1)
    assert c.prev == {} and c.state == {"n": 1, "last": {"text": "hi"}}
    assert c.applied_at.tzinfo is not None and c.applied_at.utcoffset() == UTC.utcoffset(None)
    assert abs(c.applied_at.timestamp() - time.time()) < 60
    assert c.preferences["lang"] == "en" and c.services["mailer"] == "the mailer"
    assert stored == [c.state]  # the change was committed before the listener ran


def test_listeners_run_per_id_in_seq_order(make_app: Any) -> None:
    seen: dict[str, list[int]] = {}

    def slow(c: casern.Change) -> None:
        time.sleep(0.001 * (c.seq % 3))
        seen.setdefault(c.id, []).append(c.seq)

    app = make_app(listeners={"slow": slow})
    threads = [
        threading.Thread(target=lambda i=i: [app.send("inc", f"id{i % 4}") for _ in range(10)])
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert app.drain(30)
    assert seen == {f"id{i}": list(range(1, 21)) for i in range(4)}


def test_async_listeners_work(make_app: Any) -> None:
    seen: list[int] = []

    async def listener(c: casern.Change) -> None:
        await asyncio.sleep(0.001)
        seen.append(c.seq)

    app = make_app(listeners={"alistener": listener})
    for _ in range(3):
        app.send("inc", "a")
    assert app.drain(10)
    assert seen == [1, 2, 3]


def test_listener_send_is_queued_never_recursive(make_app: Any) -> None:
    depth = threading.local()
    events: list[str] = []

    def chain(c: casern.Change) -> None:
        assert not getattr(depth, "inside", False), "send recursed into a listener"
        depth.inside = True
        try:
            if c.id == "a":
                assert c.send("inc", "b", {"from": c.seq}) is None
                events.append(f"sent from a#{c.seq}")
            else:
                events.append(f"b#{c.seq} got {c.data}")
        finally:
            depth.inside = False

    app = make_app(listeners={"chain": chain})
    app.send("inc", "a")
    assert app.drain(10)
    assert events == ["sent from a#1", "b#1 got {'from': 1}"]
    assert app.get("b") == {"n": 1, "last": {"from": 1}}


def test_a_redelivered_listener_never_applies_its_send_twice(make_app: Any) -> None:
    attempts: list[int] = []

    def flaky(c: casern.Change) -> None:
        if c.id != "a":
            return
        c.send("inc", "b")
        c.send("inc", "b")
        attempts.append(c.seq)
        if len(attempts) < 3:
            raise RuntimeError("transient")

    app = make_app(listeners={"flaky": flaky})
    app.send("inc", "a")
    assert app.drain(10)
    assert len(attempts) == 3
    assert app.get("b") == {"n": 2}  # two sends per call, each applied once
    assert app.failed() == []


def test_a_failing_listener_is_retried_then_listed_as_failed(make_app: Any) -> None:
    calls: list[tuple[str, int]] = []
    ok: list[tuple[str, int]] = []

    def broken(c: casern.Change) -> None:
        calls.append((c.id, c.seq))
        if c.id == "bad":
            raise ValueError("smtp is down")

    app = make_app(
        listeners={"broken": broken, "fine": lambda c: ok.append((c.id, c.seq))},
        backoff=casern.Backoff(attempts=3, initial=0.01, maximum=0.02),
    )
    app.send("inc", "bad")
    app.send("inc", "good")
    assert app.drain(10)
    assert calls.count(("bad", 1)) == 3 and calls.count(("good", 1)) == 1
    assert sorted(ok) == [("bad", 1), ("good", 1)]  # other listeners are not held back
    (failure,) = app.failed()
    assert failure["id"] == "bad" and failure["seq"] == 1 and failure["listener"] == "broken"
    assert failure["attempts"] == 3 and "smtp is down" in failure["error"]
    # a later change of the same id still reaches its listeners
    app.send("inc", "good")
    assert app.drain(10)
    assert ("good", 2) in ok


def test_retry_requeues_failed_deliveries_for_the_failed_listener_only(make_app: Any) -> None:
    broken = {"on": True}
    calls: list[tuple[str, str, int]] = []

    def flaky(c: casern.Change) -> None:
        calls.append(("flaky", c.id, c.seq))
        if broken["on"]:
            raise ConnectionError("down")

    app = make_app(
        listeners={"flaky": flaky, "other": lambda c: calls.append(("other", c.id, c.seq))},
        backoff=casern.Backoff(attempts=2, initial=0.01, maximum=0.01),
    )
    app.send("inc", "x")
    app.send("inc", "y")
    app.send("inc", "y")
    assert app.drain(10)
    assert len(app.failed()) == 3
    broken["on"] = False
    calls.clear()
    assert app.retry("y") == 2
    assert app.drain(10)
    assert sorted(calls) == [("flaky", "y", 1), ("flaky", "y", 2)]
    assert [(f["id"], f["seq"]) for f in app.failed()] == [("x", 1)]
    assert app.retry() == 1
    assert app.drain(10)
    assert app.failed() == []
    assert app.retry() == 0


def test_failed_reads_a_few_envelopes_at_a_time(make_app: Any) -> None:
    # failed() needs a few fields of each failure, but read every failed
    # machine's envelope at once: 400 machines with 500 KB states took 420 MB,
    # for `casern failed` and the inspector's Failed page alike.
    def fill(p: Any, s: dict[str, Any], d: Any) -> dict[str, Any]:
        return {"v": str(d) * 20_000}

    def down(c: casern.Change) -> None:
        raise ConnectionError("down")

    app = make_app({"fill": fill}, {"down": down}, backoff=casern.Backoff(attempts=1, initial=0.01))
    ids = [f"m{i:03d}" for i in range(120)]
    for i, id in enumerate(ids):
        app.send("fill", id, i % 10)
    assert app.drain(30)
    read: list[int] = []
    get_many = app.store.get_many

    def spy(some: Any) -> Any:
        read.append(len(some))
        return get_many(some)

    app.store.get_many = spy  # type: ignore[method-assign]
    rows = app.failed()
    assert [(f["id"], f["seq"], f["listener"]) for f in rows] == [(id, 1, "down") for id in ids]
    assert sum(read) == len(ids) and max(read) <= 50
    assert [f["id"] for f in app.failed(limit=7)] == ids[:7]


def test_a_hanging_listener_is_bounded_by_the_timeout(make_app: Any) -> None:
    release = threading.Event()

    def hang(c: casern.Change) -> None:
        release.wait(5)

    async def ahang(c: casern.Change) -> None:
        await asyncio.sleep(5)

    app = make_app(
        listeners={"hang": hang, "ahang": ahang},
        backoff=casern.Backoff(attempts=1, initial=0.01, maximum=0.01, timeout=0.2),
    )
    started = time.monotonic()
    app.send("inc", "a")
    assert app.drain(10)
    release.set()
    assert time.monotonic() - started < 4
    assert sorted(f["listener"] for f in app.failed()) == ["ahang", "hang"]
    assert all("Timeout" in f["error"] for f in app.failed())


def test_listeners_run_without_start(make_app: Any) -> None:
    seen: list[int] = []
    app = make_app(listeners={"spy": lambda c: seen.append(c.seq)})
    app.send("inc", "a")
    assert app.drain(10)
    assert seen == [1]


def test_delivered_changes_leave_the_outbox(make_app: Any) -> None:
    app = make_app(listeners={"spy": lambda c: None})
    for _ in range(5):
        app.send("inc", "a")
    assert app.drain(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rec = app.store.get("a")
        if rec is not None and not rec.doc.get("pending"):
            break
        time.sleep(0.05)
    assert app.store.get("a").doc.get("pending") in (None, [])
    assert app.store.pending(time.time() + 1, 10) == []


def test_a_new_app_delivers_what_a_closed_one_left_pending(make_app: Any) -> None:
    release = threading.Event()
    first: list[int] = []
    second: list[int] = []

    def stuck(c: casern.Change) -> None:
        first.append(c.seq)
        release.wait(10)
        raise RuntimeError("interrupted")

    app1 = make_app(
        listeners={"l": stuck}, backoff=casern.Backoff(attempts=5, initial=5, timeout=30)
    )
    app1.send("inc", "a")
    time.sleep(0.2)
    app1.close(timeout=0.1)  # gives up on the running delivery: it stays in the outbox
    release.set()
    app2 = make_app(listeners={"l": lambda c: second.append(c.seq)}, redeliver_after=0.0)
    app2.run_once()
    assert app2.drain(10)
    assert first == [1] and second == [1]


def test_hung_listeners_hold_back_no_other_listener_or_id(make_app: Any) -> None:
    release = threading.Event()
    quick: list[str] = []

    def hang(c: casern.Change) -> None:
        if c.id.startswith("h"):
            release.wait(30)

    app = make_app(
        listeners={"hang": hang, "quick": lambda c: quick.append(c.id)},
        # A timeout long enough that a quick call never meets it on a loaded machine.
        backoff=casern.Backoff(attempts=1, initial=0.01, maximum=0.01, timeout=1.0),
    )
    try:
        for i in range(40):  # more hung calls than any fixed pool of threads
            app.send("inc", f"h{i}")
        app.send("inc", "q")
        assert app.drain(60)
        assert "q" in quick and len(quick) == 41
        assert {f["listener"] for f in app.failed()} == {"hang"}
        assert "Backoff.timeout=1.0s" in app.failed()[0]["error"]
    finally:
        release.set()


HUNG_LISTENER_SCRIPT = """
import sys, time, casern
app = casern.Casern(sys.argv[1], {}, {}, {"inc": lambda p, s, d: {"n": 1}},
                    {"hang": lambda c: time.sleep(600)},
                    backoff=casern.Backoff(attempts=1, timeout=0.2))
app.send("inc", "a")
app.close(timeout=0.5)
print("closed")
"""


def test_a_hung_listener_does_not_keep_the_process_alive(store_url: str) -> None:
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HUNG_LISTENER_SCRIPT, store_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "closed"
    assert time.monotonic() - started < 30


def _listener_threads(ignore: frozenset[threading.Thread] = frozenset()) -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith("casern-listener") and t not in ignore
    ]


def test_listener_threads_are_bounded_and_leave_after_close(make_app: Any) -> None:
    busy = threading.Event()
    most = [0]
    # Threads of earlier tests' apps (hung listeners just released) are not this app's.
    earlier = frozenset(_listener_threads())

    def slow(c: casern.Change) -> None:
        most[0] = max(most[0], len(_listener_threads(earlier)))
        busy.wait(0.01)

    app = make_app(listeners={"slow": slow})
    for i in range(60):  # sixty lanes at once: more than the pool may take
        app.send("inc", f"m{i}")
    assert app.drain(30)
    assert 1 <= most[0] <= 9  # at most 8 workers and their watchdog
    app.close()
    deadline = time.monotonic() + 10
    while _listener_threads(earlier) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listener_threads(earlier) == []


def test_a_sync_listener_may_return_an_awaitable(make_app: Any) -> None:
    seen: list[int] = []

    async def later(seq: int) -> None:
        await asyncio.sleep(0)
        seen.append(seq)

    app = make_app(listeners={"l": lambda c: later(c.seq)})
    app.send("inc", "a")
    app.send("inc", "a")
    assert app.drain(10)
    assert seen == [1, 2]
