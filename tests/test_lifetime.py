"""CONTRACT.md, "Construction": drain, close and interpreter exit a deployment can trust."""

from __future__ import annotations

import _thread
import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import casern

EXIT_SENDER = Path(__file__).resolve().parent / "exit_sender.py"


def test_drain_is_true_only_once_every_failure_record_is_written(
    make_app: Callable[..., casern.Casern],
) -> None:
    def always_fails(change: casern.Change) -> None:
        raise KeyError("chat_id")

    app = make_app(listeners={"l": always_fails}, backoff=casern.Backoff(attempts=1))
    ids = [f"u{i}" for i in range(1_200)]  # more than two batches of acknowledgements

    def send_all(part: list[str]) -> None:
        for id in part:
            app.send("inc", id)

    threads = [threading.Thread(target=send_all, args=(ids[t::8],)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert app.drain(timeout=120)
    assert len(app.failed()) == len(ids)
    assert app.store.pending(time.time() + 60, 10_000) == []


def test_drain_waits_for_the_acknowledgements_being_written_right_now(
    make_app: Callable[..., casern.Casern],
) -> None:
    """A flush writes 500 acknowledgements a batch: with 600 deferred, it answered after
    the first batch while the committer was still writing the second."""

    def always_fails(change: casern.Change) -> None:
        raise KeyError("chat_id")

    app = make_app(listeners={"l": always_fails}, backoff=casern.Backoff(attempts=1))
    app._engine.ack_delay = app._engine.ack_patience = 600.0  # deferred until the flush
    ids = [f"u{i}" for i in range(600)]
    for id in ids:
        app.send("inc", id)
    assert app._dispatcher.wait_idle(120)
    put_many = app.store.put_many

    def slow_put_many(writes: Any) -> Any:
        time.sleep(0.2)  # the second batch is still being written when the first is answered
        return put_many(writes)

    app.store.put_many = slow_put_many  # type: ignore[method-assign]
    assert app.drain(timeout=120)
    assert len(app.failed()) == len(ids)


def test_ctrl_c_while_drain_waits_for_a_listener_is_not_held_until_it_ends(
    make_app: Callable[..., casern.Casern],
) -> None:
    """A Ctrl-C whose handler is pending while the main thread waits (as when the signal
    came just as the wait began) used to be handled only when the listener ended."""
    release = threading.Event()
    app = make_app(listeners={"slow": lambda c: release.wait(30)})
    app.send("inc", "a")
    ends = threading.Timer(8, release.set)  # the listener's end, if nothing else came first
    ends.start()
    # interrupt_main: the handler runs at the main thread's next bytecode, no wake-up.
    ctrl_c = threading.Timer(0.3, _thread.interrupt_main)
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            app.drain(timeout=20)
        assert not release.is_set(), "Ctrl-C was handled only once the listener ended"
    finally:
        ctrl_c.cancel()  # never a stray Ctrl-C in pytest's own code if drain failed early
        release.set()
        ends.cancel()


def test_close_returns_within_its_timeout_and_leaves_the_rest_pending(
    make_app: Callable[..., casern.Casern],
) -> None:
    release = threading.Event()
    app = make_app(listeners={"slow": lambda c: release.wait(30)})
    app.send("inc", "a")
    started = time.monotonic()
    app.close(timeout=2)
    took = time.monotonic() - started
    release.set()
    assert took < 3.5  # was 4 s and more: the drain's timeout, then the dispatcher's
    later = make_app(listeners={"l": lambda c: None})
    assert later.store.pending(time.time() + 60, 10) == ["a"]


def test_ctrl_c_while_close_waits_for_a_listener_still_closes_the_app(
    make_app: Callable[..., casern.Casern],
) -> None:
    release = threading.Event()
    main = threading.main_thread().ident

    def closing() -> bool:
        frame = sys._current_frames().get(main or 0)
        while frame is not None and frame.f_code.co_name != "close":
            frame = frame.f_back
        return frame is not None

    def slow(change: casern.Change) -> None:
        if change.seq > 1:
            return
        while not closing():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while close() waits for this listener
        release.wait(30)

    app = make_app(listeners={"slow": slow})
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app.send("inc", "a")
        with pytest.raises(KeyboardInterrupt):
            app.close(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
    # Before, it stayed open: the exit hook closed it again and waited 10 s more.
    with pytest.raises(casern.CasernError, match="closed"):
        app.send("inc", "a")
    later = make_app(listeners={"l": lambda c: None})
    assert later.store.pending(time.time() + 60, 10) == ["a"]  # left for a later start()


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_drain_inside_a_listener_raises_at_once(
    make_app: Callable[..., casern.Casern], kind: str
) -> None:
    errors: list[BaseException] = []
    apps: list[casern.Casern] = []

    def plain(change: casern.Change) -> None:
        try:
            apps[0].drain(timeout=30)
        except casern.CasernError as e:
            errors.append(e)

    async def coro(change: casern.Change) -> None:
        plain(change)
        await asyncio.sleep(0)

    apps.append(make_app(listeners={"l": plain if kind == "plain" else coro}))
    apps[0].send("inc", "a")
    assert apps[0].drain(timeout=10)
    assert len(errors) == 1
    assert "drain() was called from inside" in str(errors[0])


def test_an_app_open_at_interpreter_exit_finishes_its_listeners(
    store_url: str, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.txt"
    proc = subprocess.Popen(
        [sys.executable, str(EXIT_SENDER), store_url, str(effects)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"sent\n", proc.stderr.read() if proc.stderr else ""
        proc.terminate()  # SIGTERM: the worker returns from its main loop, as gunicorn's does
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err.decode()
    assert sorted(effects.read_text().split("\n")[:-1]) == [f"req-{i} 1" for i in range(5)]
    with casern.Casern(store_url, {}, {}, {"inc": lambda p, s, d: s}, {"l": print}) as app:
        assert app.store.pending(time.time() + 60, 10) == []


def test_an_app_collected_unclosed_warns_and_lets_its_threads_go(store_url: str) -> None:
    before = threading.active_count()

    def one_per_request() -> None:
        app = casern.Casern(store_url, {}, {}, {"inc": _inc}, {"l": lambda c: None})
        app.send("inc", "a")
        assert app.drain(10)

    with pytest.warns(ResourceWarning, match="unclosed <Casern"):
        for _ in range(5):
            one_per_request()
            gc.collect()
    deadline = time.monotonic() + 10
    while threading.active_count() > before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # pool threads leave once idle; the loop and committer at once
    assert threading.active_count() <= before + 5


def test_closing_an_app_with_an_async_listener_closes_its_event_loop(
    make_app: Callable[..., casern.Casern],
) -> None:
    async def listener(change: casern.Change) -> None:
        await asyncio.sleep(0)

    app = make_app(listeners={"l": listener})
    app.send("inc", "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        app.close()
        gc.collect()
    # Before, the loop thread ended with its loop open: "unclosed event loop" at exit.
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def _inc(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {"n": state.get("n", 0) + 1}


def test_a_listener_that_gives_up_is_logged_at_error_with_its_traceback(
    make_app: Callable[..., casern.Casern], caplog: pytest.LogCaptureFixture
) -> None:
    def reply(change: casern.Change) -> None:
        chat = dict(change.state)
        chat["chat_id"]  # the KeyError a user sees: a field the state lacks

    app = make_app(listeners={"reply": reply}, backoff=casern.Backoff(attempts=1))
    with caplog.at_level("ERROR", logger="casern"):
        app.send("inc", "a")
        assert app.drain(timeout=10)
    [record] = [r for r in caplog.records if "gave up" in r.getMessage()]
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert 'chat["chat_id"]' in caplog.text  # the traceback names the line
    [failure] = app.failed()
    assert failure["error"].startswith("KeyError: 'chat_id' (at test_lifetime.py:")
    assert failure["error"].endswith(" in reply)")


def test_an_async_listener_that_blocks_the_loop_is_named_in_a_warning(
    make_app: Callable[..., casern.Casern], caplog: pytest.LogCaptureFixture
) -> None:
    async def sleepy(change: casern.Change) -> None:
        time.sleep(1.5)  # blocks the loop every async listener shares

    app = make_app(listeners={"sleepy": sleepy})
    with caplog.at_level("WARNING", logger="casern"):
        app.send("inc", "a")
        app.send("inc", "b")
        assert app.drain(timeout=30)
        deadline = time.monotonic() + 10
        while "blocked the event loop" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    [warning] = [r.getMessage() for r in caplog.records if "blocked the event" in r.getMessage()]
    assert "async listener 'sleepy' blocked the event loop for" in warning
    assert "test_lifetime.py" in warning and "asyncio.to_thread" in warning


def test_the_readme_testing_snippet_runs_as_written() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Testing your reducers and listeners", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()
