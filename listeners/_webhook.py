"""POST every change, as JSON, to an HTTP endpoint."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping

import httpx

from casern._change import Change

from ._common import change_payload, dedupe_key, header_value

__all__ = ["webhook"]


def _shown(url: str) -> str:
    """The URL without credentials or query string (which often holds a token)."""
    try:
        parsed = httpx.URL(url)
    except Exception:  # an unparsable URL: show nothing of it rather than a secret
        return "<invalid URL>"
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def webhook(
    url: str | Callable[[Change], str | None],
    *,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
    service: str | None = None,
    secret: str | bytes | None = None,
) -> Callable[[Change], None]:
    """Make a listener that POSTs each change as JSON to `url`; a non-2xx answer raises.

    The body is `{id, seq, reducer, data, key, prev, state, applied_at}` (`applied_at` in
    ISO 8601). Because delivery is at least once, each request carries the headers
    `Idempotency-Key: <id>:<seq>`, `X-Casern-Id` and `X-Casern-Seq` (the id
    percent-encoded where it is not printable ASCII), so the receiver can drop repeats.
    Any failure raises, and casern retries with back-off.

    - `url`: a URL, or `fn(change) -> url | None` for a per-machine endpoint (None: skip).
    - `headers`: sent with every request (say `Authorization`); casern's headers win.
    - `client`: an `httpx.Client` you own; or `service`: the name of one in
      `change.services` (connection pooling, proxies, test transports). With neither, each
      delivery opens and closes its own connection.
    - `secret`: adds `X-Casern-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    """
    if client is not None and service is not None:
        raise ValueError("webhook(): give client= or service=, not both")
    fixed = httpx.Headers(headers or {})
    key = secret.encode() if isinstance(secret, str) else secret

    def post_change(change: Change) -> None:
        target = url(change) if callable(url) else url
        if target is None:
            return
        body = json.dumps(change_payload(change), ensure_ascii=False, separators=(",", ":"))
        content = body.encode()
        sent = httpx.Headers(fixed)
        sent["Content-Type"] = "application/json"
        sent["Idempotency-Key"] = dedupe_key(change)
        sent["X-Casern-Id"] = header_value(change.id)
        sent["X-Casern-Seq"] = str(change.seq)
        if key is not None:
            digest = hmac.new(key, content, hashlib.sha256).hexdigest()
            sent["X-Casern-Signature"] = f"sha256={digest}"

        http = client
        if service is not None:
            found = change.services.get(service)
            if not isinstance(found, httpx.Client):
                raise LookupError(
                    f"webhook: services[{service!r}] must be an httpx.Client, found "
                    f"{type(found).__name__}; pass Casern(..., services={{{service!r}: "
                    "httpx.Client()}})"
                )
            http = found
        if http is None:
            with httpx.Client(timeout=timeout) as own:
                response = own.post(target, content=content, headers=sent)
        else:
            response = http.post(target, content=content, headers=sent, timeout=timeout)
        if not response.is_success:
            # Our own message: httpx's would print the full URL, credentials and all.
            raise httpx.HTTPStatusError(
                f"webhook {_shown(target)} answered {response.status_code} "
                f"{response.reason_phrase} to change {dedupe_key(change)}",
                request=response.request,
                response=response,
            )

    return post_change
