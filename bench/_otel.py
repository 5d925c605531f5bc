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
from collections.abc import Iterator, Sequence
from typing import Any

from casern import _telemetry

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
