"""CONTRACT.md, "Listeners" and "Background work": delivery is at least once, across crashes.

The victim is tests/crash_sender.py, a real process that sends from several
threads and is killed with SIGKILL at random moments, then restarted (its
`start()` redelivers what the dead one left pending). Its listener keeps its own
durable log (append + fsync), so the log says which listener calls finished.
At the end an app in this process delivers the rest, and the log is checked
against the committed history.
"""

from __future__ import annotations

import asyncio
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import casern
from crash_sender import REDELIVER_AFTER, TICK, append_line, listeners, read_log, reducers

pytestmark = pytest.mark.slow

SENDER = Path(__file__).resolve().parent / "crash_sender.py"
BACKOFF = casern.Backoff(attempts=3, initial=0.01, maximum=0.05, timeout=10)


def run_then_kill(store_url: str, logfile: Path, stderr: Path, *args: str) -> None:
    """Start the sender, wait until it sends, SIGKILL it 0.2–1.0 s later."""
    with stderr.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SENDER), store_url, str(logfile), *args],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if readable else b""
        assert line == b"ready\n", f"the sender did not start:\n{stderr.read_text()}"
        time.sleep(random.uniform(0.2, 1.0))
        assert proc.poll() is None, f"the sender died by itself:\n{stderr.read_text()}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert "Traceback" not in stderr.read_text(), stderr.read_text()


def pending_ids(app: casern.Casern) -> list[str]:
    return app.store.pending(time.time() + 1, 1000)


def deliver_everything(app: casern.Casern, timeout: float = 30.0) -> None:
    """`start()` and wait until the outbox is empty and every listener has run."""
    app.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert app.drain(max(0.1, deadline - time.monotonic())), "listeners never finished"
            if not pending_ids(app):
                break
            assert time.monotonic() < deadline, f"still pending: {pending_ids(app)}"
            time.sleep(TICK)
    finally:
        app.stop()
    assert app.drain(10)


def committed(app: casern.Casern, id: str) -> list[int]:
    """The seqs of `id`, checked to be 1..N without gaps and to agree with its state."""
    seqs = [e["seq"] for e in app.history(id)]
    state = app.get(id) or {}
    assert seqs == list(range(1, state.get("n", 0) + 1)), f"{id}: history {seqs}, state {state}"
    return seqs


def test_sigkill_at_random_moments_loses_no_listener_call(
    store_url: str, tmp_path: Path, make_app: Callable[..., casern.Casern]
) -> None:
    logfile, stderr = tmp_path / "listener.log", tmp_path / "sender.err"
    observer = make_app(reducers)  # no listeners: only looks at the store
    left_pending = 0
    for _ in range(5):
        run_then_kill(store_url, logfile, stderr, "--mode", "log", "--ids", "5", "--threads", "4")
        left_pending += len(pending_ids(observer))
    assert left_pending, "no kill ever interrupted a delivery: the test proves nothing"

    app = make_app(
        reducers,
        listeners("log", str(logfile)),
        redeliver_after=REDELIVER_AFTER,
        tick=TICK,
        backoff=BACKOFF,
    )
    deliver_everything(app)
    assert pending_ids(app) == []
    assert app.failed() == []

    ids = app.ids()
    assert ids and set(ids) <= {f"c{i}" for i in range(5)}
    commits = {(id, seq) for id in ids for seq in committed(app, id)}
    logged = read_log(str(logfile))
    assert all(n == seq for _, _, seq, n in logged), "a listener saw a state of another seq"
    calls = {(id, seq) for _, id, seq, _ in logged}
    assert sorted(commits - calls) == [], "committed changes whose listener never ran"
    assert sorted(calls - commits) == [], "listener calls for changes never committed"


def test_a_listener_send_is_applied_once_though_the_listener_is_redelivered(
    store_url: str, tmp_path: Path, make_app: Callable[..., casern.Casern]
) -> None:
    logfile, stderr = tmp_path / "listener.log", tmp_path / "sender.err"
    # One sender thread at ~30 sends/s into "a"; the listener sends to "b", then
    # sleeps 0.05 s: a kill mostly lands after b's commit, before a's acknowledgement.
    args = ("--mode", "chain", "--threads", "1", "--pause", "0.06", "--slow", "0.05")
    for _ in range(4):
        run_then_kill(store_url, logfile, stderr, *args)

    app = make_app(
        reducers,
        listeners("chain", str(logfile), 0.05),
        redeliver_after=REDELIVER_AFTER,
        tick=TICK,
        backoff=BACKOFF,
    )
    deliver_everything(app)
    assert app.failed() == []

    a_seqs = committed(app, "a")
    b_history = app.history("b")
    committed(app, "b")
    assert a_seqs, "the sender never committed anything"
    keys = [e["key"] for e in b_history]
    assert sorted(keys) == sorted(set(keys)), "one derived key applied twice"
    assert len(b_history) == len(a_seqs)
    assert (app.get("b") or {}).get("n") == len(a_seqs)
    logged = read_log(str(logfile))
    calls = {seq for name, _, seq, _ in logged if name == "chain"}
    assert sorted(set(a_seqs) - calls) == [], "committed changes whose listener never ran"
    starts = [seq for name, _, seq, _ in logged if name == "start"]
    assert len(starts) > len(set(starts)), "no listener was redelivered: the test proves nothing"


def test_stop_and_close_during_delivery_lose_nothing(
    tmp_path: Path, make_app: Callable[..., casern.Casern]
) -> None:
    logfile = tmp_path / "listener.log"

    def slow(c: casern.Change) -> None:
        time.sleep(0.1)
        append_line(str(logfile), f"slow {c.id} {c.seq} {c.state['n']}")

    async def aslow(c: casern.Change) -> None:
        await asyncio.sleep(0.1)
        append_line(str(logfile), f"aslow {c.id} {c.seq} {c.state['n']}")

    def fast(c: casern.Change) -> None:
        append_line(str(logfile), f"{c.listener} {c.id} {c.seq} {c.state['n']}")

    app1 = make_app(
        reducers,
        {"slow": slow, "aslow": aslow},
        backoff=casern.Backoff(attempts=3, initial=5, timeout=10),
    )
    app1.start()

    async def send_all() -> None:  # all 24 commits at once, before the listeners catch up
        await asyncio.gather(*(app1.asend("inc", id) for _ in range(8) for id in "xyz"))

    asyncio.run(send_all())
    time.sleep(0.1)
    app1.stop()
    app1.close(timeout=0.1)  # mid-delivery: a few of 8 changes per lane are done

    app2 = make_app(
        reducers, {"slow": fast, "aslow": fast}, redeliver_after=REDELIVER_AFTER, tick=TICK
    )
    assert pending_ids(app2), "close() waited for every delivery: the test proves nothing"
    deliver_everything(app2)
    assert app2.failed() == []

    expected = {
        (name, id, seq) for name in ("slow", "aslow") for id in "xyz" for seq in committed(app2, id)
    }
    assert len(expected) == 2 * 3 * 8
    logged = read_log(str(logfile))
    calls = {(name, id, seq) for name, id, seq, _ in logged}
    assert all(n == seq for *_, seq, n in logged)
    assert sorted(expected - calls) == [], "listener calls lost by stop()/close()"
    assert calls == expected


def test_after_a_crash_listeners_still_run_per_id_in_seq_order(
    make_app: Callable[..., casern.Casern],
) -> None:
    # A web process (never started) and a worker share the store; a third process
    # died while delivering seq 1 of "a". The web process then commits seq 2.
    release = threading.Event()

    def stuck(c: casern.Change) -> None:
        release.wait(10)
        raise RuntimeError("the process died here")

    dead = make_app(reducers, {"l": stuck}, backoff=casern.Backoff(attempts=5, initial=5))
    dead.send("inc", "a")
    time.sleep(0.1)
    dead.close(timeout=0.1)  # seq 1 stays in the outbox, as if the process had died
    release.set()
    time.sleep(REDELIVER_AFTER + 0.1)  # ... long enough to count as abandoned

    order: list[int] = []
    lock = threading.Lock()

    def spy(c: casern.Change) -> None:
        with lock:
            order.append(c.seq)

    web = make_app(reducers, {"l": spy}, redeliver_after=REDELIVER_AFTER, backoff=BACKOFF)
    worker = make_app(
        reducers, {"l": spy}, redeliver_after=REDELIVER_AFTER, tick=TICK, backoff=BACKOFF
    )
    web.send("inc", "a")
    assert web.drain(10)
    deliver_everything(worker)
    assert web.drain(10)
    first_calls = list(dict.fromkeys(order))
    assert first_calls == [1, 2], f"listener calls in order {order}: seq 2 ran before seq 1"
