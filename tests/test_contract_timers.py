"""CONTRACT.md, "Background work": due timers fire once, never early, cost O(due)."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest

import casern


def remind(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    """Set a reminder `data["in"]` seconds after `data["at"]`."""
    return {**state, "remind_at": data["at"] + data["in"], "fired": state.get("fired", [])}


def wake(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    """The timer reducer: record every firing with its `now`."""
    return {**state, "fired": [*state.get("fired", []), data["now"]]}


def noop_wake(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return state


def wake_at(preferences: Any, state: dict[str, Any]) -> float | None:
    return state.get("remind_at")


REDUCERS = {"remind": remind, "wake": wake}
TIMERS = {"wake": wake_at}


def test_only_due_machines_fire_never_early(make_app: Any) -> None:
    app = make_app(REDUCERS, timers=TIMERS)
    now = time.time()
    for i in range(30):
        app.send("remind", f"later{i}", {"at": now, "in": 3600})
    for i in range(5):
        app.send("remind", f"due{i}", {"at": now, "in": -1})
    # Due 2 s after it is set, so a slow store cannot make it due before the first tick.
    soon = app.send("remind", "soon", {"at": time.time(), "in": 2.0})["remind_at"]
    assert app.run_once() == 5
    for i in range(5):
        fired = app.get(f"due{i}")["fired"]
        assert len(fired) == 1 and fired[0] >= now - 1
    assert all(app.get(f"later{i}")["fired"] == [] for i in range(30))
    assert app.get("soon")["fired"] == []
    time.sleep(max(0.0, soon - time.time()) + 0.1)
    assert app.run_once() == 1
    (fired_at,) = app.get("soon")["fired"]
    assert fired_at >= soon  # never before its due time


def test_a_due_time_fires_once_even_if_the_state_stays_the_same(make_app: Any) -> None:
    seen: list[int] = []
    app = make_app(
        {"remind": remind, "wake": noop_wake},
        {"spy": lambda c: seen.append(c.seq)},
        timers=TIMERS,
    )
    app.send("remind", "a", {"at": time.time(), "in": -1})
    assert app.drain(10) and seen == [1]
    assert app.run_once() == 1
    assert app.run_once() == 0  # consumed: a metadata-only write, no seq, no listener
    assert app.drain(10)
    assert app.store.get("a").doc["seq"] == 1
    assert [h["seq"] for h in app.history("a")] == [1]
    assert seen == [1]
    # a new time from the timers function fires again
    app.send("remind", "a", {"at": time.time(), "in": -2})
    assert app.run_once() == 1


def test_a_timer_set_while_no_worker_runs_fires_when_one_starts(make_app: Any) -> None:
    app = make_app(REDUCERS, timers=TIMERS)
    app.send("remind", "a", {"at": time.time(), "in": -5})
    app.close()
    worker = make_app(REDUCERS, timers=TIMERS, tick=0.05)
    worker.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not worker.get("a")["fired"]:
        time.sleep(0.05)
    worker.stop()
    assert len(worker.get("a")["fired"]) == 1


def test_a_started_app_fires_a_timer_when_it_comes_due(make_app: Any) -> None:
    app = make_app(REDUCERS, timers=TIMERS, tick=0.05)
    app.start()
    start = time.time()
    app.send("remind", "a", {"at": start, "in": 0.3})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not app.get("a")["fired"]:
        time.sleep(0.02)
    app.stop()
    (fired_at,) = app.get("a")["fired"]
    assert fired_at >= start + 0.3


def test_a_timer_reducer_that_raises_consumes_its_due_time(make_app: Any) -> None:
    def bad_wake(p: Any, s: dict[str, Any], d: Any) -> dict[str, Any]:
        raise RuntimeError("bug in the timer reducer")

    app = make_app({"remind": remind, "wake": bad_wake}, timers=TIMERS)
    app.send("remind", "a", {"at": time.time(), "in": -1})
    assert app.run_once() == 1
    assert app.run_once() == 0


def test_a_timers_function_that_raises_refuses_the_send(make_app: Any) -> None:
    def broken(p: Any, s: dict[str, Any]) -> float | None:
        raise KeyError("remind_at")

    app = make_app(REDUCERS, timers={"wake": broken})
    with pytest.raises(casern.ReducerError, match="timers function 'wake'"):
        app.send("remind", "a", {"at": 1, "in": 1})
    assert app.get("a") is None


def test_a_timers_function_that_raises_on_a_fired_change_still_consumes_the_due_time(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The timer's change cannot be scheduled, so it is not applied; the due time
    # stayed, and fired again on every tick, for good, without a log line.
    calls: list[Any] = []

    def wake_once(p: Any, s: dict[str, Any], d: Any) -> dict[str, Any]:
        calls.append(d)
        return {**s, "woke": True}

    def broken_after_waking(p: Any, s: dict[str, Any]) -> float | None:
        if s.get("woke"):
            raise KeyError("remind_at")
        return wake_at(p, s)

    app = make_app({"remind": remind, "wake": wake_once}, timers={"wake": broken_after_waking})
    app.send("remind", "a", {"at": time.time(), "in": -1})
    with caplog.at_level("ERROR", logger="casern"):
        app.run_once()
        assert app.run_once() == 0  # consumed: fired once
        app.run_once()
    assert len(calls) == 1
    assert "woke" not in app.get("a")  # the change it could not schedule is not applied
    assert any("timers function 'wake'" in r.getMessage() for r in caplog.records)
    app.send("remind", "a", {"at": time.time(), "in": -1})  # a new due time fires again
    app.run_once()
    assert len(calls) == 2


async def _astart_and_wait(app: Any) -> None:
    import asyncio

    await app.astart()
    for _ in range(200):
        if (await app.aget("a"))["fired"]:
            break
        await asyncio.sleep(0.02)
    await app.astop()


def test_astart_fires_timers_on_the_event_loop(make_app: Any) -> None:
    import asyncio

    app = make_app(REDUCERS, timers=TIMERS, tick=0.05)
    app.send("remind", "a", {"at": time.time(), "in": -1})
    asyncio.run(_astart_and_wait(app))
    assert len(app.get("a")["fired"]) == 1


def _worker(url: str, seconds: float) -> None:
    app = casern.Casern(url, {}, {}, REDUCERS, {}, timers=TIMERS, tick=0.02)
    app.start()
    time.sleep(seconds)
    app.close()


def test_two_worker_processes_fire_each_due_timer_exactly_once(
    make_app: Any, store_url: str
) -> None:
    app = make_app(REDUCERS, timers=TIMERS)
    now = time.time()
    ids = [f"m{i}" for i in range(40)]
    for i, id in enumerate(ids):
        app.send("remind", id, {"at": now, "in": 0.5 + (i % 8) * 0.1})
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(store_url, 3.5)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    for id in ids:
        state = app.get(id)
        assert len(state["fired"]) == 1, (id, state)
        assert state["fired"][0] >= state["remind_at"]


def test_a_timers_function_returning_infinity_refuses_the_send(make_app: Any) -> None:
    app = make_app(REDUCERS, timers={"wake": lambda p, s: float("inf")})
    with pytest.raises(casern.ReducerError, match="returned inf"):
        app.send("remind", "a", {"at": 1, "in": 1})
    assert app.get("a") is None


def test_a_timers_function_returning_milliseconds_is_refused_with_a_message_that_says_so(
    make_app: Any,
) -> None:
    app = make_app(REDUCERS, timers={"wake": lambda p, s: time.time() * 1000})
    with pytest.raises(casern.ReducerError, match="milliseconds"):
        app.send("remind", "a", {"at": 1, "in": 1})
    assert app.get("a") is None


def test_run_once_never_fires_early_even_when_asked_for_a_later_now(make_app: Any) -> None:
    app = make_app(REDUCERS, timers=TIMERS)
    app.send("remind", "a", {"at": time.time(), "in": 3600})
    app.run_once(now=time.time() + 7200)
    assert app.get("a")["fired"] == []


@pytest.mark.parametrize("at", [10**400, -(10**400), 2e300])
def test_a_timers_function_returning_a_huge_number_is_refused_with_a_clear_error(
    make_app: Any, at: float
) -> None:
    app = make_app(REDUCERS, timers={"wake": lambda p, s: at})
    with pytest.raises(casern.ReducerError, match="year 5000"):
        app.send("remind", "a", {"at": 1, "in": 1})
    assert app.get("a") is None
