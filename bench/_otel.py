"""Telemetry modes for `sqlite_send.py --otel`: what the OpenTelemetry hooks cost a send.

- `stubbed`: every `casern._telemetry` hook replaced by a do-nothing function, the
  nearest thing to casern without telemetry that one run can measure (each hook
  still costs a call);
- `api`: the default, the OpenTelemetry API installed and no SDK, as most users run;
- `sdk`: the SDK installed, traces (batch span processor, spans dropped by the
  exporter) and metrics (in-memory reader, aggregated but never exported).
"""

from __future__ import annotations

import contextlib
import timeit
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from casern import _telemetry
from casern._actions import SEND, Action

MODES = ("stubbed", "api", "sdk")


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


_STUBS: dict[str, Any] = {
    "begin_send": _nothing,
    "refused": _nothing,
    "track": lambda send, action: action,
    "committed": _nothing,
    "stamp": _nothing,
    "duplicate": _nothing,
    "fired": _nothing,
    "commit_duration": _nothing,
    "conflict": _nothing,
    "listener_span": lambda *args: contextlib.nullcontext(),
    "carry": lambda fn: fn,
    "delivered": _nothing,
}


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Run the block with telemetry in mode `name` (see the module docstring)."""
    if name == "api":
        yield
        return
    if name == "stubbed":
        saved = {hook: getattr(_telemetry, hook) for hook in _STUBS}
        for hook, stub in _STUBS.items():
            setattr(_telemetry, hook, stub)
        try:
            yield
        finally:
            for hook, fn in saved.items():
                setattr(_telemetry, hook, fn)
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    _telemetry.use(tracer_provider, meter_provider)
    try:
        yield
    finally:
        _telemetry.use()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def hook_cost(name: str, number: int = 20_000, repeat: int = 5) -> tuple[float, float]:
    """µs that the hooks of one send, and of one listener call, cost in mode `name`.

    The exact calls the app, committer and dispatcher make, each send answered
    (best of `repeat` tight loops, less a loop without the hooks), so this holds
    however noisy the machine is.
    """
    entry: dict[str, Any] = {"seq": 1, "at": 0.0}

    def bare() -> None:
        Action(SEND, "id", Future()).future.set_result("{}")

    def send() -> None:
        action = Action(SEND, "id", Future())
        trace = _telemetry.begin_send("bump", "id", True)
        _telemetry.track(trace, action)
        _telemetry.committed(action, 1)
        _telemetry.stamp(action, entry)
        _telemetry.commit_duration(0.0)
        action.future.set_result("{}")

    def deliver() -> None:
        with _telemetry.listener_span("id", entry, "noop"):
            _telemetry.carry(bare)
        _telemetry.delivered("noop", entry, "ok")

    def best(fn: Any) -> float:
        return float(min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6)

    with mode(name):
        return best(send) - best(bare), best(deliver)
