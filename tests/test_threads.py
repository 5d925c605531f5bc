"""casern._threads.LanePool: the bounded pool that runs plain listeners, lane by lane."""

from __future__ import annotations

import threading
import time
from typing import Any

from casern._threads import LanePool


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class Recorder:
    """run() records (lane, item); settle() records outcomes and asks for retries."""

    def __init__(self, fail_first: int = 0, retry_delay: float = 0.01) -> None:
        self.ran: list[tuple[str, int]] = []
        self.settled: list[tuple[str, int, int, Any]] = []
        self.fail_first = fail_first
        self.retry_delay = retry_delay
        self.lock = threading.Lock()

    def run(self, lane: str, item: int) -> int:
        with self.lock:
            self.ran.append((lane, item))
            fails = sum(1 for r in self.ran if r == (lane, item)) <= self.fail_first
        if fails:
            raise RuntimeError(f"{lane} {item} fails")
        return item * 10

    def settle(self, lane: str, item: int, attempt: int, outcome: Any) -> float | None:
        with self.lock:
            self.settled.append((lane, item, attempt, outcome))
        return self.retry_delay if isinstance(outcome, Exception) else None


def test_each_lane_runs_its_items_in_order_and_lanes_run_side_by_side() -> None:
    r = Recorder()
    pool: LanePool[str, int] = LanePool("t", r.run, r.settle, timeout=5)
    pool.put_many([(lane, i) for i in range(20) for lane in ("a", "b", "c")])
    assert _wait_for(lambda: len(r.settled) == 60)
    for lane in ("a", "b", "c"):
        assert [i for name, i, _, _ in r.settled if name == lane] == list(range(20))
    assert all(outcome == i * 10 for _, i, _, outcome in r.settled)
    pool.shutdown()


def test_a_failing_item_is_retried_before_the_next_item_of_its_lane() -> None:
    r = Recorder(fail_first=2)
    pool: LanePool[str, int] = LanePool("t", r.run, r.settle, timeout=5)
    pool.put_many([("a", 1), ("a", 2)])
    assert _wait_for(lambda: len([s for s in r.settled if s[1] == 2 and s[2] == 3]) == 1)
    assert [(i, attempt) for _, i, attempt, _ in r.settled] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    pool.shutdown()


def test_a_hung_call_is_settled_as_timed_out_and_its_late_result_is_dropped() -> None:
    release = threading.Event()
    settled: list[tuple[str, int, Any]] = []

    def run(lane: str, item: int) -> str:
        if lane == "hung":
            release.wait(10)
        return "done"

    def settle(lane: str, item: int, attempt: int, outcome: Any) -> float | None:
        settled.append((lane, item, outcome))
        return None

    pool: LanePool[str, int] = LanePool("t", run, settle, timeout=0.2, max_threads=1)
    pool.put_many([("hung", 1), ("hung", 2), ("quick", 1)])
    # One thread only: the quick lane runs because the hung call is replaced.
    assert _wait_for(lambda: ("quick", 1, "done") in settled)
    assert _wait_for(lambda: len(settled) == 3)
    timed_out = [s for s in settled if isinstance(s[2], TimeoutError)]
    assert [(lane, item) for lane, item, _ in timed_out] == [("hung", 1), ("hung", 2)]
    assert pool.threads() <= 1
    release.set()
    time.sleep(0.1)
    assert len(settled) == 3  # the hung calls' late results are never settled
    pool.shutdown()


def test_threads_are_bounded_and_leave_when_idle_and_at_shutdown() -> None:
    gate = threading.Event()
    most = [0]
    done: list[str] = []

    def run(lane: str, item: int) -> None:
        most[0] = max(most[0], pool.threads())
        gate.wait(0.05)
        done.append(lane)

    pool: LanePool[str, int] = LanePool(
        "casern-test-pool", run, lambda *a: None, timeout=5, max_threads=3, idle_timeout=0.2
    )
    pool.put_many([(f"lane{i}", 0) for i in range(30)])
    assert _wait_for(lambda: len(done) == 30)
    assert 1 <= most[0] <= 3
    assert _wait_for(lambda: pool.threads() == 0)  # idle workers left by themselves

    def named() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("casern-test-pool")]

    assert _wait_for(lambda: named() == [])  # the watchdog too, once nothing is left to watch
    pool.put_many([("again", 1)])
    pool.shutdown()
    assert _wait_for(lambda: named() == [])


def test_after_shutdown_queued_items_are_dropped_and_new_ones_refused() -> None:
    gate = threading.Event()
    ran: list[int] = []

    def run(lane: str, item: int) -> None:
        ran.append(item)
        gate.wait(5)

    pool: LanePool[str, int] = LanePool("t", run, lambda *a: None, timeout=10, max_threads=1)
    pool.put_many([("a", 1), ("a", 2), ("a", 3)])
    assert _wait_for(lambda: ran == [1])
    pool.shutdown()
    gate.set()
    pool.put_many([("b", 4)])
    time.sleep(0.2)
    assert ran == [1]
