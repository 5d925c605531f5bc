"""CONTRACT.md, "Observability": metrics and spans from the send to the listener.

Each test installs a fresh OpenTelemetry SDK (in-memory span exporter and
metric reader) through `casern._telemetry.use`, because the global providers
can be set only once per process. The crash test's victim installs its SDK
globally, as an application would.
"""

from __future__ import annotations

import asyncio
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer
from otel_sender import read_spans

import casern
from casern import _telemetry

SENDER = Path(__file__).resolve().parent / "otel_sender.py"
METRICS = {
    "casern.sends",
    "casern.commit.duration",
    "casern.conflicts",
    "casern.deliveries",
    "casern.delivery.lag",
    "casern.outbox.pending",
    "casern.timers.fired",
    "casern.timers.lag",
}


class Otel:
    """A private SDK: finished spans and collected metrics, for one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer: Tracer = self.tracer_provider.get_tracer("test")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name in (None, s.name)]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of `metric`; empty if never recorded."""
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        out += [(dict(p.attributes or {}), p) for p in m.data.data_points]
        return out

    def count(self, metric: str, **attributes: str) -> int:
        """A counter's value (a histogram's count) over points with these attributes."""
        total = 0
        for attrs, p in self.points(metric):
            if all(attrs.get(k) == v for k, v in attributes.items()):
                total += p.count if hasattr(p, "count") else p.value
        return total


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    _telemetry.use(o.tracer_provider, o.meter_provider)
    yield o
    _telemetry.use()
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


def inc(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    state["n"] = state.get("n", 0) + 1
    return state


def same(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return state


def boom(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    raise ValueError("no")


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def sends_of(otel: Otel, id: str) -> list[ReadableSpan]:
    spans = [s for s in otel.spans("casern.send") if (s.attributes or {})["casern.id"] == id]
    return sorted(spans, key=lambda s: (s.attributes or {}).get("casern.seq", 0))


# -- traces -----------------------------------------------------------------------------------


def test_send_runs_in_a_span_that_is_a_child_of_the_callers_span(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    app = make_app({"inc": inc})
    with otel.tracer.start_as_current_span("request") as request:
        app.send("inc", "m/1")
        app.send("inc", "m/1")
    assert app.drain(10)
    first, second = sends_of(otel, "m/1")
    for span, seq in ((first, 1), (second, 2)):
        assert parent_id(span) == request.get_span_context().span_id
        assert trace_id(span) == request.get_span_context().trace_id
        assert span.attributes == {
            "casern.id": "m/1",
            "casern.reducer": "inc",
            "casern.seq": seq,
            "casern.outcome": "committed",
        }


def test_group_committed_sends_keep_each_callers_span_as_parent(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    app = make_app({"inc": inc})
    requests: dict[int, int] = {}  # request span id -> the id it sent to

    async def one(i: int) -> None:
        with otel.tracer.start_as_current_span(f"request {i}") as request:
            requests[request.get_span_context().span_id] = i
            await app.asend("inc", f"g{i % 4}")

    async def all_at_once() -> None:
        await asyncio.gather(*(one(i) for i in range(24)))

    def threads(i: int) -> None:
        with otel.tracer.start_as_current_span(f"request {i}") as request:
            requests[request.get_span_context().span_id] = i
            app.send("inc", f"g{i % 4}")

    asyncio.run(all_at_once())
    workers = [threading.Thread(target=threads, args=(i,)) for i in range(24, 32)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert app.drain(10)
    sends = otel.spans("casern.send")
    assert len(sends) == 32
    assert sorted(parent_id(s) or 0 for s in sends) == sorted(requests)
    for s in sends:
        i = requests[parent_id(s) or 0]
        assert (s.attributes or {})["casern.id"] == f"g{i % 4}"
    seqs = {((s.attributes or {})["casern.id"], (s.attributes or {})["casern.seq"]) for s in sends}
    assert seqs == {(f"g{k}", n) for k in range(4) for n in range(1, 9)}
    # Fewer store writes than sends: the sends above were really committed together.
    assert otel.count("casern.commit.duration") < 32


def test_each_listener_call_runs_in_a_span_that_is_a_child_of_its_send_span(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    async def notify(change: casern.Change) -> None:
        pass

    app = make_app({"inc": inc}, {"audit": lambda c: None, "notify": notify})
    with otel.tracer.start_as_current_span("request"):
        app.send("inc", "a")
        app.send("inc", "a")
    assert app.drain(10)
    listeners = otel.spans("casern.listener")
    assert len(listeners) == 4
    by_seq = {(s.attributes or {})["casern.seq"]: span_id(s) for s in sends_of(otel, "a")}
    for s in listeners:
        attrs = s.attributes or {}
        assert attrs["casern.listener"] in ("audit", "notify")
        assert attrs["casern.id"] == "a"
        assert parent_id(s) == by_seq[attrs["casern.seq"]]
    assert {(s.attributes or {})["casern.listener"] for s in listeners} == {"audit", "notify"}


def test_change_send_continues_the_trace(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    def forward(change: casern.Change) -> None:
        if change.id == "a":
            change.send("inc", "b")

    async def aforward(change: casern.Change) -> None:
        if change.id == "a":
            change.send("inc", "c")

    app = make_app({"inc": inc}, {"forward": forward, "aforward": aforward})
    with otel.tracer.start_as_current_span("request") as request:
        app.send("inc", "a")
    assert app.drain(10)
    listener_of = {
        (s.attributes or {})["casern.listener"]: s
        for s in otel.spans("casern.listener")
        if (s.attributes or {})["casern.id"] == "a"
    }
    (b,) = sends_of(otel, "b")
    (c,) = sends_of(otel, "c")
    assert parent_id(b) == span_id(listener_of["forward"])
    assert parent_id(c) == span_id(listener_of["aforward"])
    # ... and their own listeners are children of those sends, in the same trace.
    for send in (b, c):
        children = [s for s in otel.spans("casern.listener") if parent_id(s) == span_id(send)]
        assert len(children) == 2
    assert {trace_id(s) for s in otel.spans() if s.name.startswith("casern.")} == {
        request.get_span_context().trace_id
    }


def wake(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    state["woken"] = data["now"]
    return state


def set_alarm(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    state["at"] = data
    return state


def alarm(preferences: Any, state: dict[str, Any]) -> float | None:
    return None if "woken" in state else state.get("at")


def test_a_timer_firing_starts_a_trace_of_its_own(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    app = make_app({"set": set_alarm, "wake": wake}, {"l": lambda c: None}, timers={"wake": alarm})
    due = time.time() - 1.0
    with otel.tracer.start_as_current_span("request") as request:
        app.send("set", "t", due)
    assert app.run_once() == 1
    assert app.drain(10)
    set_span, fire = sends_of(otel, "t")
    assert parent_id(set_span) == request.get_span_context().span_id
    assert fire.parent is None, "a timer firing is linked to nothing"
    assert trace_id(fire) != request.get_span_context().trace_id
    assert fire.attributes == {
        "casern.id": "t",
        "casern.reducer": "wake",
        "casern.timer": True,
        "casern.seq": 2,
    }
    (listener,) = [s for s in otel.spans("casern.listener") if parent_id(s) == span_id(fire)]
    assert (listener.attributes or {})["casern.seq"] == 2
    assert otel.count("casern.timers.fired", reducer="wake") == 1
    ((_, lag),) = otel.points("casern.timers.lag")
    assert lag.count == 1 and lag.sum >= 1.0  # fired at least 1 s after its due time
    assert otel.count("casern.sends", reducer="wake") == 0, "a firing is not a send"


# -- metrics ----------------------------------------------------------------------------------


def test_sends_are_counted_by_reducer_and_outcome(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    def nested(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        app.send("same", "elsewhere")  # refused: reducers must be pure
        return state

    app = make_app(
        {"inc": inc, "same": same, "boom": boom, "nested": nested},
        schemas={"inc": {"type": ["object", "null"]}},
    )
    app.send("inc", "s", key="k1")
    app.send("inc", "s", key="k1")
    app.send("same", "s")
    with pytest.raises(casern.ReducerError):
        app.send("boom", "s")
    with pytest.raises(casern.InvalidData):
        app.send("inc", "s", [1])
    with pytest.raises(casern.UnknownReducer):
        app.send("nope", "s")
    with pytest.raises(casern.ReducerError):
        app.send("nested", "s")
    assert app.drain(10)
    counts = {
        (attrs["reducer"], attrs["outcome"]): p.value for attrs, p in otel.points("casern.sends")
    }
    assert counts == {
        ("inc", "committed"): 1,
        ("inc", "duplicate"): 1,
        ("same", "unchanged"): 1,
        ("boom", "error"): 1,
        ("inc", "error"): 1,
        ("unknown", "error"): 1,
        ("nested", "error"): 1,
        ("same", "error"): 1,
    }
    failed = [s for s in otel.spans("casern.send") if s.status.status_code == StatusCode.ERROR]
    assert sorted((s.attributes or {})["casern.reducer"] for s in failed) == [
        "boom",
        "inc",
        "nested",
        "same",
        "unknown",
    ]
    assert all(s.events and s.events[0].name == "exception" for s in failed)
    assert otel.count("casern.commit.duration") >= 1


def test_listener_calls_are_counted_ok_retry_failed_with_their_lag(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    calls = {"flaky": 0}

    def flaky(change: casern.Change) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("once")

    def broken(change: casern.Change) -> None:
        raise RuntimeError("always")

    app = make_app(
        {"inc": inc},
        {"flaky": flaky, "broken": broken},
        backoff=casern.Backoff(attempts=3, initial=0.01, maximum=0.02),
    )
    app.send("inc", "d")
    assert app.drain(10)
    assert otel.count("casern.deliveries", listener="flaky", outcome="retry") == 1
    assert otel.count("casern.deliveries", listener="flaky", outcome="ok") == 1
    assert otel.count("casern.deliveries", listener="broken", outcome="retry") == 2
    assert otel.count("casern.deliveries", listener="broken", outcome="failed") == 1
    assert otel.count("casern.deliveries", listener="broken", outcome="ok") == 0
    assert otel.count("casern.delivery.lag", listener="flaky") == 1
    assert otel.count("casern.delivery.lag", listener="broken") == 0
    spans = otel.spans("casern.listener")
    errors = [s for s in spans if s.status.status_code == StatusCode.ERROR]
    assert len(spans) == 5 and len(errors) == 4  # one span per call, failed ones marked


def test_write_conflicts_are_counted_and_the_send_still_commits(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    first, second = make_app({"inc": inc}), make_app({"inc": inc})
    first.send("inc", "w")  # first caches w's revision ...
    second.send("inc", "w")  # ... which this makes stale
    assert first.send("inc", "w") == {"n": 3}
    assert otel.count("casern.conflicts") == 1
    last = sends_of(otel, "w")[-1]
    assert (last.attributes or {})["casern.seq"] == 3
    assert (last.attributes or {})["casern.outcome"] == "committed"
    assert otel.count("casern.sends", outcome="committed") == 3


def test_outbox_pending_counts_changes_whose_listeners_have_not_finished(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    release = threading.Event()
    app = make_app({"inc": inc}, {"slow": lambda c: release.wait(10)})

    def pending() -> int:
        ((_, point),) = otel.points("casern.outbox.pending")
        return int(point.value)

    app.send("inc", "p1")
    app.send("inc", "p2")
    assert pending() == 2
    release.set()
    assert app.drain(10)
    assert pending() == 0


def test_no_metric_attribute_ever_holds_an_id(
    otel: Otel, make_app: Callable[..., casern.Casern]
) -> None:
    def fails(change: casern.Change) -> None:
        raise RuntimeError(change.id)

    app = make_app(
        {"inc": inc, "set": set_alarm, "wake": wake},
        {"fails": fails, "ok": lambda c: None},
        timers={"wake": alarm},
        backoff=casern.Backoff(attempts=2, initial=0.01, maximum=0.02),
    )
    for i in range(3):
        app.send("inc", f"secret-{i}", key=f"secret-key-{i}")
    app.send("set", "secret-t", time.time() - 1)
    app.run_once()
    assert app.drain(10)
    seen = set()
    for metric in METRICS:
        for attrs, _ in otel.points(metric):
            seen.add(metric)
            assert set(attrs) <= {"reducer", "listener", "outcome"}, (metric, attrs)
            assert not any("secret" in str(v) for v in attrs.values()), (metric, attrs)
    assert seen == METRICS - {"casern.conflicts"}


def test_without_an_sdk_nothing_is_traced_or_stored(make_app: Callable[..., casern.Casern]) -> None:
    release = threading.Event()
    app = make_app({"inc": inc}, {"slow": lambda c: release.wait(10)})
    with _TracerOnly() as otel:
        app.send("inc", "traced")
    app.send("inc", "plain")
    docs = app.store.get_many(["traced", "plain"])
    assert _telemetry.TRACEPARENT in docs["traced"].doc["pending"][0]
    assert _telemetry.TRACEPARENT not in docs["plain"].doc["pending"][0]
    release.set()
    assert app.drain(10)
    assert [(s.attributes or {})["casern.id"] for s in otel.spans("casern.send")] == ["traced"]


class _TracerOnly(Otel):
    """An SDK for traces only, installed for a `with` block."""

    def __enter__(self) -> Otel:
        _telemetry.use(self.tracer_provider)
        return self

    def __exit__(self, *exc: object) -> None:
        _telemetry.use()


# -- across a crash ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_change_redelivered_after_a_crash_continues_its_trace(
    otel: Otel, make_app: Callable[..., casern.Casern], store_url: str, tmp_path: Path
) -> None:
    spans_file, stderr = tmp_path / "spans.jsonl", tmp_path / "sender.err"
    victim = [sys.executable, str(SENDER), store_url, str(spans_file)]
    # Unbuffered: select() sees every line not read yet. Leaving the block closes and reaps.
    with (
        stderr.open("wb") as err,
        subprocess.Popen(victim, stdout=subprocess.PIPE, stderr=err, bufsize=0) as proc,
    ):
        try:
            assert proc.stdout is not None
            lines: set[bytes] = set()
            deadline = time.monotonic() + 30
            while lines != {b"sent\n", b"listening\n"} and time.monotonic() < deadline:
                readable, _, _ = select.select([proc.stdout], [], [], 1)
                if readable:
                    lines.add(proc.stdout.readline())
            assert lines == {b"sent\n", b"listening\n"}, stderr.read_text()
            proc.send_signal(signal.SIGKILL)  # committed, its listener under way
            assert proc.wait(10) == -signal.SIGKILL
        finally:
            proc.kill()  # does nothing once it is dead
    dead = {s["name"]: s for s in read_spans(str(spans_file))}
    assert set(dead) == {"request", "casern.send"}, "the victim did not record its spans"
    assert dead["casern.send"]["parent"] == dead["request"]["span_id"]

    ran: list[int] = []
    app = make_app({"inc": inc}, {"effect": lambda c: ran.append(c.seq)}, redeliver_after=0.2)
    time.sleep(0.3)
    app.run_once()
    assert app.drain(10)
    assert ran == [1]
    (listener,) = otel.spans("casern.listener")
    assert parent_id(listener) == dead["casern.send"]["span_id"]
    assert trace_id(listener) == dead["request"]["trace_id"]
    assert (listener.attributes or {})["casern.listener"] == "effect"
