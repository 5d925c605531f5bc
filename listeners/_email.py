"""Send an email about a change, through an injected sender or an SMTP server."""

from __future__ import annotations

import hashlib
import smtplib
import ssl
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Literal, TypeAlias

from casern._change import Change

from ._common import header_value

__all__ = ["Render", "email", "message_id"]

#: `render(change)` decides whether and what to send: `(to, subject, body)` with `to` one
#: address or several, a ready `EmailMessage` for full control (HTML, attachments), or
#: None to send nothing for this change.
Render: TypeAlias = Callable[[Change], "tuple[str | Sequence[str], str, str] | EmailMessage | None"]


def message_id(change: Change, domain: str = "casern.invalid") -> str:
    """The `Message-ID` of the mail a listener sends about `change`, the same on every retry.

    It is derived from `(id, seq, listener name)`, so a receiver that drops repeated
    Message-IDs sees each change at most once per listener.
    """
    digest = hashlib.sha256(f"{change.id}\0{change.seq}\0{change.listener}".encode())
    return f"<casern.{change.seq}.{digest.hexdigest()[:32]}@{domain}>"


def email(
    render: Render,
    *,
    from_addr: str,
    service: str = "smtp",
    host: str | None = None,
    port: int = 25,
    tls: Literal["starttls", "ssl"] | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 10.0,
) -> Callable[[Change], None]:
    """Make a listener that mails what `render(change)` returns; None sends nothing.

    The mail goes to `change.services[service]` (any object with
    `send_message(EmailMessage)`, like `smtplib.SMTP` or your provider's adapter), or,
    when `host` is given, through a fresh SMTP connection to `host:port` per mail
    (`tls="starttls"` or `"ssl"`, and `username`/`password` to log in). Each mail has a
    `Message-ID` derived from `(id, seq, listener)` (see `message_id`) and the headers
    `X-Casern-Id`/`X-Casern-Seq`, because delivery is at least once. A failure raises,
    and casern retries with back-off.
    """
    if tls not in (None, "starttls", "ssl"):
        raise ValueError(f"email(tls=...) must be None, 'starttls' or 'ssl', not {tls!r}")
    if (username is None) != (password is None):
        raise ValueError("email(): give both username= and password=, or neither")
    domain = parseaddr(from_addr)[1].rpartition("@")[2] or "casern.invalid"

    def build(change: Change) -> EmailMessage | None:
        rendered = render(change)
        if rendered is None:
            return None
        if isinstance(rendered, EmailMessage):
            msg = rendered
        else:
            to, subject, body = rendered
            msg = EmailMessage()
            msg["To"] = to if isinstance(to, str) else ", ".join(to)
            msg["Subject"] = subject
            msg.set_content(body)
        if "From" not in msg:
            msg["From"] = from_addr
        if "Message-ID" not in msg:
            msg["Message-ID"] = message_id(change, domain)
        for name, value in (
            ("X-Casern-Id", header_value(change.id)),
            ("X-Casern-Seq", str(change.seq)),
        ):
            del msg[name]
            msg[name] = value
        return msg

    def send_over_smtp(msg: EmailMessage, host: str) -> None:
        smtp: smtplib.SMTP
        if tls == "ssl":
            smtp = smtplib.SMTP_SSL(
                host, port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        with smtp:
            if tls == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if username is not None and password is not None:
                smtp.login(username, password)
            smtp.send_message(msg)

    def send_mail(change: Change) -> None:
        msg = build(change)
        if msg is None:
            return
        if host is not None:
            send_over_smtp(msg, host)
            return
        sender = change.services.get(service)
        if sender is None or not callable(getattr(sender, "send_message", None)):
            raise LookupError(
                f"email: no sender in services[{service!r}]; pass Casern(..., services="
                f"{{{service!r}: smtplib.SMTP('localhost')}}) or email(..., host='smtp.host')"
            )
        sender.send_message(msg)

    return send_mail
