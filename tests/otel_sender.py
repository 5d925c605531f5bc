"""A traced casern app that commits one change, then hangs in its listener until killed.

    python tests/otel_sender.py STORE_URL SPANS_FILE

The victim of tests/test_telemetry.py's crash test. It installs the
OpenTelemetry SDK globally (as an application would) with an exporter that
appends each finished span to SPANS_FILE as one JSON line, sends `inc` to "x"
inside a span `request`, and prints `sent`; its listener `effect` prints
`listening` and never returns. The test SIGKILLs it and lets another app
redeliver the change.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import casern


class LineExporter(SpanExporter):
    """Each span as one JSON line, written at once (it survives SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for s in spans:
            assert s.context is not None
            line = {
                "name": s.name,
                "trace_id": s.context.trace_id,
                "span_id": s.context.span_id,
                "parent": s.parent.span_id if s.parent else None,
                "attributes": dict(s.attributes or {}),
            }
            os.write(self.fd, (json.dumps(line) + "\n").encode())
        return SpanExportResult.SUCCESS


def read_spans(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f.read().split("\n")[:-1]]
    except FileNotFoundError:
        return []


def inc(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    state["n"] = state.get("n", 0) + 1
    return state


def main() -> None:
    store, spans_file = sys.argv[1:3]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LineExporter(spans_file)))
    trace.set_tracer_provider(provider)

    def effect(change: casern.Change) -> None:
        os.write(1, b"listening\n")  # one write: lines from two threads never interleave
        threading.Event().wait()  # until SIGKILL

    app = casern.Casern(store, {}, {}, {"inc": inc}, {"effect": effect})
    with trace.get_tracer("otel_sender").start_as_current_span("request"):
        app.send("inc", "x")
    os.write(1, b"sent\n")
    threading.Event().wait()


if __name__ == "__main__":
    main()
