"""The support-inquiry flow from the README of the original (JavaScript) casern.

A customer's inquiry starts a machine; a timer checks it `timeout` seconds after the
last inquiry; if nobody answered by then the inquiry is escalated, and a listener
emails support. Reducers stay pure: the time comes in the data (`{"now": ...}`), and
casern's timer sends `{"now": <epoch seconds>}` when it fires.

Run it end to end (a 1 s timeout, a printing mail sender)::

    python -m examples.support

or drive it from the command line (the factory takes store=, timeout=, email=)::

    casern --app examples.support:make_app send initialInquiry ticket-7 \\
        '{"text": "My order is late", "now": 1700000000}'
    casern --app examples.support:make_app worker      # fires checkTimeout when due
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import casern
from casern import State

SUPPORT = "support@example.org"


# -- reducers: pure, the clock arrives in the data --------------------------------------


def initial_inquiry(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """A customer asks something: remember it and when (`lastInquiry`)."""
    at = data.get("lastInquiry", data.get("now"))
    if not isinstance(at, int | float):
        raise ValueError('initialInquiry needs the time in its data: {"text": ..., "now": epoch}')
    state["status"] = "waiting"
    state["inquiry"] = data.get("text", "")
    state["lastInquiry"] = at
    state["inquiries"] = state.get("inquiries", 0) + 1
    return state


def answer(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """Support answered: nothing is waiting any more."""
    state["status"] = "answered"
    state["answer"] = data.get("text", "") if isinstance(data, dict) else str(data)
    return state


def check_timeout(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """The timer fired (data `{"now": epoch}`): escalate an inquiry left unanswered too long."""
    waited = data["now"] - state.get("lastInquiry", data["now"])
    if state.get("status") == "waiting" and waited >= preferences["timeout"]:
        state["status"] = "escalated"
    return state


def check_timeout_due(preferences: Mapping[str, Any], state: State) -> float | None:
    """When to send `checkTimeout`: `timeout` seconds after the last inquiry, while waiting."""
    if state.get("status") != "waiting":
        return None
    return float(state["lastInquiry"]) + float(preferences["timeout"])


# -- listener: the effect, through an injected service ----------------------------------


def email_support(change: casern.Change) -> None:
    """Mail support once when an inquiry becomes escalated.

    Delivery is at least once, so the Message-ID is derived from `(id, seq)`: a
    mail server (or the fake below) drops the repeat of a redelivered change.
    """
    if change.state.get("status") != "escalated" or change.prev.get("status") == "escalated":
        return
    msg = EmailMessage()
    msg["From"] = "casern@example.org"
    msg["To"] = change.preferences["support"]
    msg["Subject"] = f"Inquiry {change.id} escalated"
    msg["Message-ID"] = f"<{change.id}.{change.seq}@casern.example.org>"
    msg.set_content(
        f"Nobody answered within {change.preferences['timeout']:g} s:\n\n"
        f"    {change.state.get('inquiry', '')}\n"
    )
    change.services["email"].send_message(msg)


class PrintingMailer:
    """A stand-in for `smtplib.SMTP`: prints each mail once, keeps them in `sent`."""

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self.arrived = threading.Event()

    def send_message(self, msg: EmailMessage) -> None:
        with self._lock:
            if msg["Message-ID"] in self._ids:
                return
            self._ids.add(msg["Message-ID"])
            self.sent.append(msg)
        print(f"  [email] to {msg['To']}: {msg['Subject']}", flush=True)
        self.arrived.set()


def make_app(
    store: str = "sqlite:///support.db",
    *,
    timeout: float = 600.0,
    email: Any = None,
    tick: float = 1.0,
) -> casern.Casern:
    """The support app; `casern --app examples.support:make_app ...` uses it as is."""
    return casern.Casern(
        store,
        {"timeout": timeout, "support": SUPPORT},
        {"email": email if email is not None else PrintingMailer()},
        {"initialInquiry": initial_inquiry, "answer": answer, "checkTimeout": check_timeout},
        {"emailSupport": email_support},
        schemas={
            "initialInquiry": {
                "type": "object",
                "properties": {"text": {"type": "string"}, "now": {"type": "number"}},
                "required": ["text"],
            }
        },
        timers={"checkTimeout": check_timeout_due},
        tick=tick,
    )


def main(timeout: float = 1.0) -> int:
    """Two inquiries: one is answered in time, the other escalates and mails support."""
    mailer = PrintingMailer()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'support.db'}"
        print(f"support example on {store}, timeout {timeout:g} s")
        with make_app(store, timeout=timeout, email=mailer, tick=0.1) as app:
            app.start()  # the scheduler fires checkTimeout when it is due
            started = time.time()
            for id, text in [("ticket-1", "Where is my order?"), ("ticket-2", "Can I pay later?")]:
                state = app.send("initialInquiry", id, {"text": text, "now": time.time()})
                print(f"  {id}: {state['status']}  ({text})")
            state = app.send("answer", "ticket-2", {"text": "Yes, within 30 days."})
            print(f"  ticket-2: {state['status']}  (support replied)")
            print(f"  waiting for the {timeout:g} s timeout ...")
            mailer.arrived.wait(timeout + 10)
            app.drain(10)
            final = {id: app.get(id) or {} for id in ("ticket-1", "ticket-2")}
            for id, state in final.items():
                print(f"  {id}: {state.get('status')}")
            print(f"  {len(mailer.sent)} email(s) sent after {time.time() - started:.1f} s")
    ok = (
        final["ticket-1"].get("status") == "escalated"
        and final["ticket-2"].get("status") == "answered"
        and len(mailer.sent) == 1
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
