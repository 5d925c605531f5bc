"""Reusable listeners: the effects that follow a committed change.

A listener is `fn(change) -> None` (or `async def`), registered with
`casern.Casern(..., listeners={"name": fn})`. It receives one `casern.Change` and does
its work through `change.services`, never inside a reducer. Keep in mind how casern
delivers:

- after the commit, never before, and per id in `seq` order;
- at least once: a listener that raises is retried with back-off, and one cut short by
  a crash runs again after a restart. So a receiver may see a change twice, and
  `(id, seq)` is the key that lets it drop the repeat: every listener here passes it on
  (`Idempotency-Key` for webhooks, `Message-ID` for mail, the `id`/`seq` log fields).

::

    import casern
    from casern.listeners import email, log, webhook

    app = casern.Casern(
        "sqlite:///support.db", {}, {"smtp": my_mail_sender},
        reducers,
        {
            "log": log(),
            "crm": webhook("https://crm.example.org/casern", headers={"Authorization": token}),
            "escalation-mail": email(
                lambda c: ("support@example.org", f"Inquiry {c.id} escalated", "Please answer.")
                if c.state.get("escalated") and not c.prev.get("escalated") else None,
                from_addr="casern@example.org",
            ),
        },
    )
"""

from __future__ import annotations

from ._email import Render, email, message_id
from ._log import log
from ._webhook import webhook

__all__ = ["Render", "email", "log", "message_id", "webhook"]
