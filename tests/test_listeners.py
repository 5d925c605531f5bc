"""casern.listeners: tested for real against loopback HTTP and SMTP servers."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

import casern
from casern._change import Change
from casern.listeners import email, log, message_id, webhook
from casern.reducers import merge

APPLIED_AT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def make_change(**overrides: Any) -> Change:
    fields: dict[str, Any] = {
        "id": "conv-1",
        "reducer": "inquiry",
        "data": {"text": "where is my order?", "now": 1000.0},
        "key": "req-17",
        "seq": 3,
        "prev": {"status": "open"},
        "state": {"status": "open", "last_inquiry": 1000.0},
        "applied_at": APPLIED_AT,
        "preferences": {},
        "services": {},
        "send": lambda *args, **kwargs: None,
        "listener": "notify",
    }
    fields.update(overrides)
    return Change(**fields)


# A loopback HTTP server ----------------------------------------------------------------


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HookServer:
    """Records every request; answers with `status`."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.requests.append(
                    Received("POST", self.path, dict(self.headers.items()), self.rfile.read(length))
                )
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def hook() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# webhook -------------------------------------------------------------------------------


def test_webhook_posts_the_change_as_json_with_idempotency_headers(hook: HookServer) -> None:
    webhook(f"{hook.url}/hooks/casern", headers={"Authorization": "Bearer t0k"})(make_change())

    [request] = hook.requests
    assert request.path == "/hooks/casern"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == "Bearer t0k"
    assert request.headers["Idempotency-Key"] == "conv-1:3"
    assert request.headers["X-Casern-Id"] == "conv-1"
    assert request.headers["X-Casern-Seq"] == "3"
    assert json.loads(request.body) == {
        "id": "conv-1",
        "seq": 3,
        "reducer": "inquiry",
        "data": {"text": "where is my order?", "now": 1000.0},
        "key": "req-17",
        "prev": {"status": "open"},
        "state": {"status": "open", "last_inquiry": 1000.0},
        "applied_at": "2024-05-06T07:08:09.123456+00:00",
    }


def test_webhook_redelivery_sends_the_same_idempotency_key(hook: HookServer) -> None:
    deliver = webhook(hook.url)
    deliver(make_change())
    deliver(make_change())
    assert [r.headers["Idempotency-Key"] for r in hook.requests] == ["conv-1:3", "conv-1:3"]
    assert hook.requests[0].body == hook.requests[1].body


def test_webhook_percent_encodes_ids_that_are_not_printable_ascii(hook: HookServer) -> None:
    odd = "conv/ü 1%"
    webhook(hook.url)(make_change(id=odd))
    [request] = hook.requests
    assert request.headers["X-Casern-Id"] == "conv/%C3%BC%201%25"
    assert unquote(request.headers["X-Casern-Id"]) == odd
    assert request.headers["Idempotency-Key"] == "conv/%C3%BC%201%25:3"
    assert json.loads(request.body)["id"] == odd


@pytest.mark.parametrize("status", [404, 500, 503, 302])
def test_webhook_raises_on_a_non_2xx_answer_so_casern_retries(
    hook: HookServer, status: int
) -> None:
    hook.status = status
    with pytest.raises(httpx.HTTPStatusError) as caught:
        webhook(hook.url + "/in")(make_change())
    assert caught.value.response.status_code == status
    assert f"answered {status}" in str(caught.value)
    assert "conv-1:3" in str(caught.value)


def test_webhook_error_never_shows_credentials_or_query_tokens(hook: HookServer) -> None:
    hook.status = 500
    url = hook.url.replace("http://", "http://alice:s3cret@") + "/in?token=t0ps3cret"
    with pytest.raises(httpx.HTTPStatusError) as caught:
        webhook(url)(make_change())
    message = str(caught.value)
    assert "s3cret" not in message and "t0ps3cret" not in message
    assert "/in" in message


def test_webhook_raises_when_the_endpoint_cannot_be_reached() -> None:
    with pytest.raises(httpx.TransportError):
        webhook(f"http://127.0.0.1:{free_port()}/", timeout=2.0)(make_change())


def test_webhook_url_can_depend_on_the_change_and_skip_it(hook: HookServer) -> None:
    deliver = webhook(lambda change: change.state.get("callback"))
    deliver(make_change())  # no callback in this machine's state: nothing is sent
    assert hook.requests == []
    deliver(make_change(state={"callback": hook.url + "/device/7"}))
    assert [r.path for r in hook.requests] == ["/device/7"]


def test_webhook_uses_the_http_client_from_services(hook: HookServer) -> None:
    with httpx.Client(headers={"User-Agent": "from-services"}) as client:
        webhook(hook.url, service="http")(make_change(services={"http": client}))
        webhook(hook.url, client=client)(make_change())
    assert [r.headers["User-Agent"] for r in hook.requests] == ["from-services"] * 2
    assert all(r.headers["Idempotency-Key"] == "conv-1:3" for r in hook.requests)


def test_webhook_names_the_missing_service() -> None:
    with pytest.raises(LookupError, match="services\\['http'\\]"):
        webhook("http://127.0.0.1:9/", service="http")(make_change())


def test_webhook_takes_a_client_or_a_service_not_both() -> None:
    with httpx.Client() as client, pytest.raises(ValueError):
        webhook("http://127.0.0.1:9/", client=client, service="http")


def test_webhook_signs_the_body_with_the_secret(hook: HookServer) -> None:
    webhook(hook.url, secret="shh")(make_change())
    [request] = hook.requests
    expected = hmac.new(b"shh", request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Casern-Signature"] == f"sha256={expected}"


# email ---------------------------------------------------------------------------------


class Outbox:
    """A sender service, as `change.services["smtp"]`: anything with `send_message`."""

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []

    def send_message(self, msg: EmailMessage) -> None:
        self.sent.append(msg)


def escalation_mail(change: Change) -> tuple[list[str], str, str] | None:
    if not change.state.get("escalated") or change.prev.get("escalated"):
        return None
    return ["support@example.org", "lead@example.org"], f"{change.id} escalated", "Answer it."


ESCALATED = {"prev": {"last_inquiry": 1000.0}, "state": {"last_inquiry": 1000.0, "escalated": True}}


def test_email_sends_the_rendered_mail_through_the_smtp_service() -> None:
    outbox = Outbox()
    notify = email(escalation_mail, from_addr="Casern <casern@example.org>")
    notify(make_change(services={"smtp": outbox}, **ESCALATED))

    [msg] = outbox.sent
    assert msg["From"] == "Casern <casern@example.org>"
    assert msg["To"] == "support@example.org, lead@example.org"
    assert msg["Subject"] == "conv-1 escalated"
    assert msg.get_content().strip() == "Answer it."
    assert msg["X-Casern-Id"] == "conv-1"
    assert msg["X-Casern-Seq"] == "3"
    assert msg["Message-ID"].endswith("@example.org>")


def test_email_render_returning_none_sends_nothing() -> None:
    outbox = Outbox()
    email(escalation_mail, from_addr="casern@example.org")(make_change(services={"smtp": outbox}))
    assert outbox.sent == []


def test_email_message_id_is_the_same_on_redelivery_and_unique_per_change_and_listener() -> None:
    outbox = Outbox()
    notify = email(escalation_mail, from_addr="casern@example.org")
    for change in [
        make_change(services={"smtp": outbox}, **ESCALATED),
        make_change(services={"smtp": outbox}, **ESCALATED),  # redelivered
        make_change(services={"smtp": outbox}, seq=4, **ESCALATED),
        make_change(services={"smtp": outbox}, listener="other", **ESCALATED),
    ]:
        notify(change)
    ids = [msg["Message-ID"] for msg in outbox.sent]
    assert ids[0] == ids[1] == message_id(make_change(), "example.org")
    assert len({ids[0], ids[2], ids[3]}) == 3


def test_email_accepts_a_ready_message_and_adds_the_dedupe_headers() -> None:
    def html(change: Change) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = "desk@example.org"
        msg["To"] = "a@example.org"
        msg["Subject"] = "hi"
        msg["X-Casern-Seq"] = "stale"
        msg.add_alternative("<p>hi</p>", subtype="html")
        return msg

    outbox = Outbox()
    email(html, from_addr="casern@example.org")(make_change(services={"smtp": outbox}))
    [msg] = outbox.sent
    assert msg["From"] == "desk@example.org"
    assert msg.get_all("X-Casern-Seq") == ["3"]
    assert msg["Message-ID"] == message_id(make_change(), "example.org")


def test_email_header_values_cannot_be_injected_through_the_id() -> None:
    outbox = Outbox()
    notify = email(lambda c: ("a@example.org", "s", "b"), from_addr="casern@example.org")
    notify(make_change(id="conv 1\r\nBcc: evil@example.org", services={"smtp": outbox}))
    [msg] = outbox.sent
    assert msg["Bcc"] is None
    assert msg["X-Casern-Id"] == "conv%201%0D%0ABcc:%20evil@example.org"


def test_email_without_a_sender_says_how_to_provide_one() -> None:
    notify = email(lambda c: ("a@example.org", "s", "b"), from_addr="casern@example.org")
    with pytest.raises(LookupError, match="services\\['smtp'\\]"):
        notify(make_change())


NOT_A_TLS_MODE: Any = "tls"


def test_email_rejects_inconsistent_options() -> None:
    with pytest.raises(ValueError):
        email(escalation_mail, from_addr="x@example.org", tls=NOT_A_TLS_MODE)
    with pytest.raises(ValueError):
        email(escalation_mail, from_addr="x@example.org", username="u")


class SMTPSink(socketserver.ThreadingTCPServer):
    """Just enough SMTP (RFC 5321) to accept mail on loopback and keep it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []
        super().__init__(("127.0.0.1", 0), SMTPHandler)


class SMTPHandler(socketserver.StreamRequestHandler):
    server: SMTPSink

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 sink ESMTP")
        sender = ""
        recipients: list[str] = []
        while line := self.rfile.readline():
            verb = line.decode().strip().split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 sink")
            elif verb == "MAIL":
                sender, recipients = line.decode().strip()[10:], []
                self.reply("250 OK")
            elif verb == "RCPT":
                recipients.append(line.decode().strip()[8:])
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 end with .")
                body = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    body += chunk
                self.server.mails.append((sender, recipients, body))
                self.reply("250 OK queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 OK")


@pytest.fixture
def smtp_sink() -> Iterator[SMTPSink]:
    sink = SMTPSink()
    thread = threading.Thread(
        target=sink.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    yield sink
    sink.shutdown()
    sink.server_close()
    thread.join(5)


def test_email_round_trips_through_a_real_smtp_server(smtp_sink: SMTPSink) -> None:
    port = smtp_sink.server_address[1]
    notify = email(escalation_mail, from_addr="casern@example.org", host="127.0.0.1", port=port)
    notify(make_change(**ESCALATED))

    [(sender, recipients, raw)] = smtp_sink.mails
    assert sender == "<casern@example.org>"
    assert recipients == ["<support@example.org>", "<lead@example.org>"]
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["Subject"] == "conv-1 escalated"
    assert msg["Message-ID"] == message_id(make_change(), "example.org")
    assert msg["X-Casern-Seq"] == "3"


def test_email_raises_when_the_smtp_server_cannot_be_reached() -> None:
    notify = email(
        lambda c: ("a@example.org", "s", "b"),
        from_addr="casern@example.org",
        host="127.0.0.1",
        port=free_port(),
        timeout=2.0,
    )
    with pytest.raises(OSError):
        notify(make_change())


# log -----------------------------------------------------------------------------------


def test_log_writes_one_structured_record_per_change(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="casern.changes"):
        log()(make_change())
    [record] = caplog.records
    assert record.name == "casern.changes"
    assert record.levelno == logging.INFO
    assert record.getMessage() == "conv-1 seq=3 inquiry changed last_inquiry"
    names = ("id", "seq", "reducer", "key", "changed", "applied_at")
    assert {k: getattr(record, k) for k in names} == {
        "id": "conv-1",
        "seq": 3,
        "reducer": "inquiry",
        "key": "req-17",
        "changed": ["last_inquiry"],
        "applied_at": "2024-05-06T07:08:09.123456+00:00",
    }
    assert not hasattr(record, "state")


def test_log_includes_states_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.casern.audit")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        log(logger, logging.DEBUG, states=True)(make_change(prev={"a": 1}, state={}))
    [record] = caplog.records
    assert record.getMessage() == "conv-1 seq=3 inquiry changed a"
    fields = {k: getattr(record, k) for k in ("prev", "state", "data")}
    assert fields == {"prev": {"a": 1}, "state": {}, "data": make_change().data}


def test_log_stays_silent_below_its_logger_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="casern.changes"):
        log()(make_change())
    assert caplog.records == []


# with the engine -----------------------------------------------------------------------


def wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_webhook_receives_every_committed_change_after_the_commit(
    hook: HookServer, tmp_path: Any
) -> None:
    reducers = {"merge": merge}
    listeners = {"hook": webhook(hook.url + "/changes")}
    with casern.Casern(f"sqlite:///{tmp_path}/w.db", {}, {}, reducers, listeners) as app:
        app.send("merge", "dev/7", {"on": True})
        app.send("merge", "dev/7", {"on": True})  # unchanged: commits nothing, posts nothing
        app.send("merge", "dev/7", {"on": False}, key="k-2")
        wait_for(lambda: len(hook.requests) >= 2)
    bodies = [json.loads(r.body) for r in hook.requests]
    assert [(b["id"], b["seq"], b["key"], b["state"]) for b in bodies] == [
        ("dev/7", 1, None, {"on": True}),
        ("dev/7", 2, "k-2", {"on": False}),
    ]
    assert [r.headers["Idempotency-Key"] for r in hook.requests] == ["dev/7:1", "dev/7:2"]


def test_failing_webhook_is_kept_as_failed_without_leaking_credentials(
    hook: HookServer, tmp_path: Any
) -> None:
    hook.status = 503
    url = hook.url.replace("http://", "http://alice:s3cret@") + "/in"
    backoff = casern.Backoff(attempts=2, initial=0.01, maximum=0.02, timeout=5)
    store = f"sqlite:///{tmp_path}/f.db"
    with casern.Casern(
        store, {}, {}, {"merge": merge}, {"hook": webhook(url)}, backoff=backoff
    ) as app:
        app.send("merge", "m-1", {"a": 1})
        wait_for(lambda: bool(app.failed()))
        [failure] = app.failed()
    assert (failure["id"], failure["seq"], failure["listener"]) == ("m-1", 1, "hook")
    assert failure["attempts"] == 2
    assert "503" in failure["error"] and "s3cret" not in failure["error"]
    assert len(hook.requests) == 2
    assert {r.headers["Idempotency-Key"] for r in hook.requests} == {"m-1:1"}
