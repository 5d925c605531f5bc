"""Who may look, and what a page may do in a browser.

The inspector shows every state and can re-run listeners, so it is guarded as
an admin tool: with a token, every request needs `Authorization: Bearer
<token>` or the cookie the login form sets (an HMAC of the token, never the
token itself); a request that changes something (POST) also needs the header
or a same-origin browser request, so another site cannot post a form to it
(CSRF). Without a token, `casern inspect` only answers requests whose Host is
a loopback name, so a web page cannot reach it through DNS rebinding. Every
response forbids inline scripts, framing and caching: even a state that holds
markup can only ever be text.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["COOKIE", "Guard", "cookie_value", "is_loopback"]

COOKIE = "casern_inspector"

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def is_open(path: str) -> bool:
    """Reachable without logging in: the login form and its stylesheet and script."""
    return path == "/login" or (path.startswith("/static/") and ".." not in path)


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cookie_value(token: str) -> str:
    """What the login cookie holds: derived from the token, useless to recover it."""
    return hmac.new(token.encode(), b"casern-inspector-login", hashlib.sha256).hexdigest()


def route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette's rule for `root_path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def same_origin(headers: Headers) -> bool:
    """False for a browser request sent by another site.

    Browsers send `Origin` with every POST (and `Sec-Fetch-Site`); a request
    with neither comes from a program (curl, a script), not a page.
    """
    origin = headers.get("origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc == headers.get("host", "")
    site = headers.get("sec-fetch-site")
    return site is None or site in ("same-origin", "none")


class Guard:
    """ASGI middleware: host check, token check, same-origin POSTs, security headers."""

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        *,
        loopback_only: bool = False,
        login_page: Callable[[Scope], Response] | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_value(token) if token else None
        self.loopback_only = loopback_only
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
            await send(message)

        headers = Headers(scope=scope)
        bearer = self._bearer_ok(headers)
        authed = self.token is None or bearer or self._cookie_ok(headers)
        # Pages offer "log out" only to a browser that logged in with the form.
        login = bool(self.token) and authed and not bearer
        scope = dict(scope, state={**scope.get("state", {}), "casern_login": login})
        refusal = self.refusal(scope, headers, bearer=bearer, authed=authed)
        await (refusal or self.app)(scope, receive, secured)

    def refusal(
        self, scope: Scope, headers: Headers, *, bearer: bool, authed: bool
    ) -> ASGIApp | None:
        """The response that refuses this request, or None to let it through."""
        path = route_path(scope)
        host = urlsplit("//" + headers.get("host", "")).hostname or ""
        if self.loopback_only and not is_loopback(host):
            return PlainTextResponse(
                "This inspector answers only on 127.0.0.1/localhost; start it with --token"
                " to serve it under other names.",
                403,
            )
        if not authed and not is_open(path):
            if path.startswith("/api/") or self.login_page is None or scope["method"] != "GET":
                return JSONResponse(
                    {"error": "this inspector needs the header 'Authorization: Bearer <token>'"},
                    401,
                    {"www-authenticate": 'Bearer realm="casern"'},
                )
            return self.login_page(scope)
        if scope["method"] not in SAFE_METHODS and not bearer and not same_origin(headers):
            return JSONResponse(
                {
                    "error": "cross-site request refused: POST from the inspector's own"
                    " pages, or send 'Authorization: Bearer <token>'"
                },
                403,
            )
        return None

    def _bearer_ok(self, headers: Headers) -> bool:
        if self.token is None:
            return False
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    def _cookie_ok(self, headers: Headers) -> bool:
        if self.cookie is None:
            return False
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.cookie.encode()):
                return True
        return False
