"""Telemetry: casern's OpenTelemetry tracer, meter and instrument names, in one place.

The app, the committer and the dispatcher call the small functions below; stores
never do. Only the OpenTelemetry *API* is imported, and every function first
asks whether an SDK is installed (a real TracerProvider or MeterProvider, looked
up again every second, so one installed after casern was imported counts): without
one, each hook returns at once and telemetry costs next to nothing.

A trace follows one action from its caller to its effects. The `casern.send`
span starts in the caller's thread or task, so it is a child of the caller's
current span even though the committer thread writes it together with other
callers' sends (group commit); it ends when the send is answered. The W3C
traceparent of that span is written with the change into its outbox entry, so
every `casern.listener` span is a child of it, also in another process that
redelivers the change after a crash. A timer firing is a send with no caller:
its `casern.send` span starts a trace of its own.

Metric attributes stay low-cardinality: reducer and listener names and
outcomes, never an id.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from ._actions import Action

__all__ = [
    "Send",
    "begin_send",
    "carry",
    "commit_duration",
    "committed",
    "conflict",
    "delivered",
    "duplicate",
    "fired",
    "listener_span",
    "refused",
    "stamp",
    "track",
    "use",
    "watch_outbox",
]

SCOPE = "casern"
TRACEPARENT = "traceparent"  # the outbox entry's field: the casern.send span's W3C context

# Seconds, from a fast SQLite commit to a listener that waited out its retries.
_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
_W3C = TraceContextTextMapPropagator()
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_NO_TRACES = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
# The API's stand-in until an SDK is installed is private: found defensively (if a
# later API renames it, metrics merely cost a no-op call each instead of nothing).
_PROXY_METERS = getattr(getattr(metrics, "_internal", None), "_PROXY_METER_PROVIDER", None)
_NO_METRICS: tuple[type, ...] = (metrics.NoOpMeterProvider,) + (
    (type(_PROXY_METERS),) if _PROXY_METERS is not None else ()
)

F = TypeVar("F", bound=Callable[..., Any])


class _Outbox(Protocol):
    def backlog(self) -> int: ...


_outboxes: weakref.WeakSet[_Outbox] = weakref.WeakSet()


class _Telemetry:
    """The tracer and the instruments of one (tracer provider, meter provider) pair."""

    def __init__(self, tracer: trace.Tracer | None, meter: metrics.Meter, metering: bool) -> None:
        def seconds(name: str, description: str) -> metrics.Histogram:
            return meter.create_histogram(
                name, "s", description, explicit_bucket_boundaries_advisory=_SECONDS
            )

        self.tracer = tracer
        self.metering = metering
        self.sends = meter.create_counter(
            "casern.sends", "{send}", "sends answered, by reducer and outcome"
        )
        self.commit_duration = seconds(
            "casern.commit.duration",
            "time of one revision-checked store write (many sends when group-committed)",
        )
        self.conflicts = meter.create_counter(
            "casern.conflicts", "{conflict}", "envelope writes lost to another writer, retried"
        )
        self.deliveries = meter.create_counter(
            "casern.deliveries", "{call}", "listener calls, by listener and outcome"
        )
        self.delivery_lag = seconds(
            "casern.delivery.lag", "from the commit of a change to its listener's success"
        )
        meter.create_observable_gauge(
            "casern.outbox.pending",
            [_observe_outbox],
            "{change}",
            "committed changes this process is delivering whose listeners have not all finished",
        )
        self.timers_fired = meter.create_counter(
            "casern.timers.fired", "{timer}", "due times fired, by reducer"
        )
        self.timers_lag = seconds("casern.timers.lag", "from a timer's due time to its firing")


def _observe_outbox(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    yield metrics.Observation(sum(o.backlog() for o in list(_outboxes)))


# Providers installed by `use` (tests), else the global ones. Looking the global
# ones up costs microseconds (an environment lookup each), so the answer is kept
# for a second: an SDK installed after the first send is picked up within one.
_RECHECK = 1.0
_providers: tuple[trace.TracerProvider | None, metrics.MeterProvider | None] = (None, None)
_built: tuple[object, object, _Telemetry | None] = (None, None, None)
_answer: tuple[float, _Telemetry | None] = (float("-inf"), None)  # (valid until, telemetry)


def use(
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Report to these providers instead of the global ones (None: the global ones again).

    The global providers can be set only once per process; tests install a
    fresh in-memory SDK per test through this. Takes effect at once.
    """
    global _providers, _answer
    _providers = (tracer_provider, meter_provider)
    _answer = (float("-inf"), None)


def _current() -> _Telemetry | None:
    """The telemetry to report to, or None when no SDK is installed (the fast path)."""
    until, found = _answer
    if time.monotonic() < until:
        return found
    return _lookup()


def _lookup() -> _Telemetry | None:
    global _built, _answer
    tp = _providers[0] or trace.get_tracer_provider()
    mp = _providers[1] or metrics.get_meter_provider()
    if _built[0] is tp and _built[1] is mp:
        found = _built[2]
    else:
        found = None
        tracing = not isinstance(tp, _NO_TRACES)
        metering = not isinstance(mp, _NO_METRICS)
        if tracing or metering:
            from . import __version__

            tracer = tp.get_tracer(SCOPE, __version__) if tracing else None
            meter = mp.get_meter(SCOPE, __version__) if metering else metrics.NoOpMeter(SCOPE)
            found = _Telemetry(tracer, meter, metering)
        _built = (tp, mp, found)
    _answer = (time.monotonic() + _RECHECK, found)
    return found


# -- sends and timer firings (caller's thread, then the committer) ----------------------


class Send:
    """The telemetry of one queued send or timer firing, reported when it is answered.

    The committer fills it in while it folds the action; a write conflict makes
    it fold again, so `conflict` forgets what the lost fold found.
    """

    __slots__ = ("id", "outcome", "reducer", "seq", "span", "t", "timers")

    def __init__(self, t: _Telemetry, reducer: str, id: str, span: trace.Span | None) -> None:
        self.t = t
        self.reducer = reducer
        self.id = id
        self.span = span  # the span entries are stamped with (for a firing: the latest)
        self.seq = 0
        self.outcome = "unchanged"
        self.timers: list[tuple[trace.Span | None, str, float, int]] = []

    def forget(self) -> None:
        self.seq = 0
        self.outcome = "unchanged"
        self.timers = []  # their spans were never ended, so never exported


def begin_send(reducer: str, id: str, known: bool) -> Send | None:
    """Start the `casern.send` span in the caller's thread: its parent is the caller's span.

    An unknown reducer is reported as `unknown`: a caller's typos must not mint
    metric series.
    """
    t = _current()
    if t is None:
        return None
    if not known:
        reducer = "unknown"
    span = None
    if t.tracer is not None:
        span = t.tracer.start_span(
            "casern.send", attributes={"casern.id": id, "casern.reducer": reducer}
        )
    return Send(t, reducer, id, span)


def refused(send: Send | None, error: BaseException) -> None:
    """A send refused before it was queued (bad id, data, key ...): an `error`."""
    if send is not None:
        send.t.sends.add(1, {"reducer": send.reducer, "outcome": "error"})
        if send.span is not None:
            _end_with_error(send.span, error)


def track(send: Send | None, action: Action) -> Action:
    """Attach `send` to its queued action; it is reported when the action's future resolves."""
    if send is not None:
        action.trace = send
        action.future.add_done_callback(functools.partial(_answered, send))
    return action


def committed(action: Action, seq: int) -> None:
    """The fold gave `action` a new seq (committed once the write lands)."""
    send = action.trace
    if send is not None:
        send.seq = seq
        send.outcome = "committed"
        if send.timers:
            span, name, lag, _ = send.timers[-1]
            send.timers[-1] = (span, name, lag, seq)


def stamp(action: Action, entry: dict[str, Any]) -> None:
    """Record the action's span context in its outbox entry, for the listeners' spans."""
    send = action.trace
    if send is not None and send.span is not None:
        _W3C.inject(entry, trace.set_span_in_context(send.span))
        entry.pop("tracestate", None)  # only the traceparent is kept


def duplicate(action: Action) -> None:
    """The send's idempotency key was already applied: nothing was written."""
    send = action.trace
    if send is not None:
        send.outcome = "duplicate"


def fired(action: Action, id: str, reducer: str, due: float, now: float) -> None:
    """The fold fires `reducer`'s due time: a new trace, linked to nothing."""
    send = action.trace
    if send is None:
        t = _current()
        if t is None:
            return
        send = Send(t, "", id, None)
        action.trace = send
        action.future.add_done_callback(functools.partial(_answered, send))
    span = None
    if send.t.tracer is not None:
        span = send.t.tracer.start_span(
            "casern.send",
            context=otel_context.Context(),  # a root: the timer has no caller
            attributes={"casern.id": id, "casern.reducer": reducer, "casern.timer": True},
        )
    send.span = span
    send.timers.append((span, reducer, max(0.0, now - due), 0))


def _answered(send: Send, future: Future[Any]) -> None:
    """Report a send or a firing once the committer answered it."""
    t = send.t
    error = CancelledError() if future.cancelled() else future.exception()
    if send.timers:
        for span, reducer, lag, seq in send.timers:
            t.timers_fired.add(1, {"reducer": reducer})
            t.timers_lag.record(lag, {"reducer": reducer})
            if span is not None:
                if seq:
                    span.set_attribute("casern.seq", seq)
                span.end()
        return
    if not send.reducer:
        return  # a firing that found nothing due
    outcome = "error" if error is not None else send.outcome
    t.sends.add(1, {"reducer": send.reducer, "outcome": outcome})
    span = send.span
    if span is not None:
        span.set_attribute("casern.outcome", outcome)
        if error is not None:
            _end_with_error(span, error)
            return
        if send.seq:
            span.set_attribute("casern.seq", send.seq)
        span.end()


def _end_with_error(span: trace.Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


# -- the committer's writes ---------------------------------------------------------------


def commit_duration(seconds: float) -> None:
    """One revision-checked store write (of one or many envelopes) took `seconds`."""
    t = _current()
    if t is not None and t.metering:
        t.commit_duration.record(seconds)


def conflict(actions: Iterable[Action]) -> None:
    """An envelope write lost to another writer; its actions are folded again."""
    t = _current()
    if t is not None:
        t.conflicts.add(1)
    for a in actions:
        if a.trace is not None:
            a.trace.forget()


# -- deliveries (the dispatcher's loop) ---------------------------------------------------


def watch_outbox(outbox: _Outbox) -> None:
    """Count `outbox.backlog()` in `casern.outbox.pending` while the outbox lives."""
    _outboxes.add(outbox)


def listener_span(
    id: str, entry: Mapping[str, Any], listener: str
) -> contextlib.AbstractContextManager[Any]:
    """A `casern.listener` span around one listener call, child of the change's send span.

    The parent comes from the outbox entry, not from memory, so a process that
    redelivers another's change continues that change's trace.
    """
    t = _current()
    if t is None or t.tracer is None:
        return _NO_SPAN
    parent = _W3C.extract(entry) if TRACEPARENT in entry else otel_context.Context()
    span = t.tracer.start_span(
        "casern.listener",
        context=parent,
        attributes={"casern.listener": listener, "casern.id": id, "casern.seq": entry["seq"]},
    )
    return trace.use_span(span, end_on_exit=True)


def carry(fn: F) -> F:
    """`fn`, bound to the current context when it runs in another thread.

    A plain listener runs in a thread pool; bound, the listener span is current
    there, so its own spans and its `change.send` join the change's trace.
    """
    if _current() is None:
        return fn
    return functools.partial(contextvars.copy_context().run, fn)  # type: ignore[return-value]


def delivered(listener: str, entry: Mapping[str, Any], outcome: str) -> None:
    """One listener call ended: `ok`, `retry` (it raised, will retry) or `failed` (gave up)."""
    t = _current()
    if t is None or not t.metering:
        return
    t.deliveries.add(1, {"listener": listener, "outcome": outcome})
    if outcome == "ok":
        t.delivery_lag.record(max(0.0, time.time() - entry["at"]), {"listener": listener})
