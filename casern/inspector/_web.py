"""The inspector's pages and JSON API, as one Starlette app.

Every view reads through the app's public methods (`ids`, `find`, `inspect`,
`history`, `failed`, `retry`), one page of ids or one machine at a time, so a
page costs the same with a hundred machines as with a million. Views are plain
functions: Starlette runs them in its thread pool, beside the event loop.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from .._app import Casern
from .._errors import CasernError, InvalidId, StoreUnavailable
from ._security import COOKIE, Guard, cookie_value, route_path
from ._timeline import timeline

__all__ = ["build", "quote_id"]

HERE = Path(__file__).parent
PAGE = 50  # ids per page of the machines list
API_LIMIT = 1000  # the most ids one API call returns
TIMELINE = 100  # newest changes a machine page shows before "show all"
SHOWN = 1000  # characters of one value a timeline shows

AppSource = Casern | Callable[[], Casern]


# -- templates ---------------------------------------------------------------------------


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _compact(value: Any) -> str:
    """A timeline's value on one line, cut after SHOWN characters.

    A page shows 100 changes, each with its data and its diff's old and new
    values: whole, a 100 KB field made a 30 MB page. The API has all of it.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if len(text) <= SHOWN:
        return text
    return f"{text[:SHOWN]} … ({len(text):,} characters in all; the JSON API has them)"


def _epoch(value: float | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return float(value)


def _when(value: float | str | None) -> str:
    at = _epoch(value)
    if at is None:
        return "—"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(value: float | str | None) -> str:
    """`in 4 min`, `3 s ago`: what a person reads first in a timeline."""
    at = _epoch(value)
    if at is None:
        return ""
    delta = at - time.time()
    size = abs(delta)
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if size >= seconds:
            text = f"{int(size // seconds)} {unit}"
            break
    else:
        text = f"{int(size)} s"
    return f"in {text}" if delta > 0 else f"{text} ago"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # a state is data, never markup
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(
    pretty=_pretty,
    compact=_compact,
    when=_when,
    relative=_relative,
    urlid=lambda id: quote_id(str(id)),
)


# -- ids in paths ------------------------------------------------------------------------

_ID_ROUTES = ("/api/machines/", "/machines/")


def quote_id(id: str) -> str:
    """An id as one path segment: every reserved byte encoded, `/` as `%2F`.

    `.` and `..` are encoded too: clients and browsers resolve them as dot
    segments before sending.
    """
    quoted = quote(id, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _raw_path(scope: Scope) -> str | None:
    """The request path as sent, before servers decode `%2F` into `/`."""
    raw = scope.get("raw_path")
    if raw:
        uri = raw.decode("latin-1")
    else:
        environ = scope.get("wsgi_environ") or {}  # a2wsgi: the WSGI server's raw URI
        uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    # Some clients put the query in raw_path; an encoded id has no literal "?".
    return str(uri).partition("?")[0] if uri else None


class EncodedIds:
    """Route machine paths on the raw path, so an id may hold `/` (sent as `%2F`).

    ASGI and WSGI servers decode the path before routing; `a%2Fb/history` would
    become `a/b/history`. This puts the still-encoded id back in the path; the
    views unquote it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = route_path(scope)
            marker = next((m for m in _ID_ROUTES if path.startswith(m)), None)
            raw = _raw_path(scope) if marker else None
            if marker and raw and marker in raw:
                routed = marker + raw[raw.rindex(marker) + len(marker) :]
                root = scope.get("root_path", "")
                mounted = root and scope["path"].startswith(root)
                scope = dict(scope, path=root + routed if mounted else routed)
        await self.app(scope, receive, send)


def _local(target: str) -> str:
    """A path inside the inspector to redirect to, never another site (`//x`, `/\\x`)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _id(request: Request) -> str:
    """The id from the path; a stray byte is refused, never read as another id (U+FFFD)."""
    encoded = request.path_params["id"]
    try:
        return unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        raise InvalidId(
            f"the id in the path is not percent-encoded UTF-8: {encoded!r:.80}"
        ) from None


# -- the app -----------------------------------------------------------------------------


class Inspector:
    """The views, bound to one casern app (or a function that returns it)."""

    def __init__(self, source: AppSource, token: str | None) -> None:
        self.source = source
        self.token = token

    @property
    def app(self) -> Casern:
        return self.source if isinstance(self.source, Casern) else self.source()

    # -- rendering ----------------------------------------------------------------------

    def store_url(self) -> str:
        """The store, for the page header: credentials removed by the store itself."""
        try:
            return self.app.store.url
        except CasernError:  # the app factory failed: the error page still renders
            return "(no store)"

    def render(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        return self.render_scope(request.scope, template, status, **ctx)

    def render_scope(self, scope: Scope, template: str, status: int = 200, **ctx: Any) -> Response:
        base = scope.get("root_path", "")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        html = ENV.get_template(template).render(
            base=base,
            retried=next((n for n in query.get("retried", []) if n.isdigit()), None),
            version=__version__,
            store=self.store_url(),
            logged_in=bool(scope.get("state", {}).get("casern_login")),
            **ctx,
        )
        return HTMLResponse(html, status)

    def login_page(self, scope: Scope) -> Response:
        """The form a browser without the token gets instead of a page (status 401)."""
        target = route_path(scope) or "/"
        query = scope.get("query_string", b"").decode("latin-1")
        return self.render_scope(
            scope,
            "login.html",
            401,
            title="Log in",
            next=target + (f"?{query}" if query else ""),
            error=None,
        )

    def error(self, request: Request, exc: Exception) -> Response:
        status = 503 if isinstance(exc, StoreUnavailable) else 400
        if isinstance(exc, HTTPException):
            status = exc.status_code
        message = str(exc.detail if isinstance(exc, HTTPException) else exc)
        if route_path(request.scope).startswith("/api/"):
            return JSONResponse({"error": message}, status)
        return self.render(request, "error.html", status, title=f"Error {status}", message=message)

    # -- reading ------------------------------------------------------------------------

    def list_ids(self, prefix: str, selector: str, after: str | None, limit: int) -> list[str]:
        """One page of ids, by prefix (`ids`) or by a find selector (`find`)."""
        if not selector:
            return self.app.ids(prefix=prefix, after=after, limit=limit)
        if prefix:
            raise ValueError("filter by id prefix or by selector, not both")
        try:
            query = json.loads(selector)
        except ValueError as e:
            raise ValueError(f'the selector is not JSON ({e}); try {{"status": "open"}}') from None
        if not isinstance(query, dict):
            raise ValueError('a selector is a JSON object, like {"status": "open"}')
        return self.app.find(query, limit=limit, after=after)

    def machine(self, id: str) -> dict[str, Any]:
        info = self.app.inspect(id)
        if info is None:
            raise HTTPException(404, f"no machine {id!r} in {self.app.store.url}")
        return info

    # -- pages --------------------------------------------------------------------------

    def machines_page(self, request: Request) -> Response:
        q = request.query_params
        prefix, selector = q.get("prefix", ""), q.get("selector", "").strip()
        after = q.get("after") or None
        error, ids = None, []
        try:
            ids = self.list_ids(prefix, selector, after, PAGE + 1)
        except (CasernError, ValueError) as e:
            if isinstance(e, StoreUnavailable):
                raise
            error = str(e)
        more = len(ids) > PAGE
        ids = ids[:PAGE]
        filters = {k: v for k, v in (("prefix", prefix), ("selector", selector)) if v}
        return self.render(
            request,
            "machines.html",
            400 if error else 200,
            title="Machines",
            ids=ids,
            prefix=prefix,
            selector=selector,
            after=after,
            error=error,
            first=("?" + urlencode(filters)) if after else None,
            next=("?" + urlencode({**filters, "after": ids[-1]})) if more else None,
        )

    def machine_page(self, request: Request) -> Response:
        id = _id(request)
        info = self.machine(id)
        show_all = request.query_params.get("all") == "1"
        note: str | None = None
        entries: list[dict[str, Any]] = []
        try:
            line = timeline(self.app, id, info["state"])
            entries, note = line.entries, line.note
        except CasernError as e:  # history=False
            if isinstance(e, StoreUnavailable):
                raise
            note = str(e)
        newest = list(reversed(entries))
        return self.render(
            request,
            "machine.html",
            title=id,
            m=info,
            entries=newest if show_all else newest[:TIMELINE],
            hidden=0 if show_all else max(0, len(newest) - TIMELINE),
            note=note,
            now=time.time(),
        )

    def failed_page(self, request: Request) -> Response:
        rows = self.app.failed(limit=1000)
        return self.render(request, "failed.html", title="Failed deliveries", rows=rows)

    async def retry_form(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        id = form.get("id", [""])[0] or None
        count = await run_in_threadpool(self.app.retry, id)
        back = _local(form.get("back", ["/"])[0])
        base = request.scope.get("root_path", "")
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{base}{back}{sep}retried={count}", 303)

    def login_get(self, request: Request) -> Response:
        base = request.scope.get("root_path", "")
        if self.token is None:
            return RedirectResponse(base + "/", 303)
        target = request.query_params.get("next", "/")
        return self.render(request, "login.html", title="Log in", next=target, error=None)

    async def login_post(self, request: Request) -> Response:
        base = request.scope.get("root_path", "")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = form.get("token", [""])[0]
        target = _local(form.get("next", ["/"])[0])
        if self.token is None:
            return RedirectResponse(base + target, 303)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self.render(
                request, "login.html", 401, title="Log in", next=target, error="Wrong token."
            )
        response = RedirectResponse(base + target, 303)
        response.set_cookie(
            COOKIE,
            cookie_value(self.token),
            path=base or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    def logout(self, request: Request) -> Response:
        base = request.scope.get("root_path", "")
        response = RedirectResponse(base + "/login", 303)
        response.delete_cookie(COOKIE, path=base or "/")
        return response

    # -- JSON API -----------------------------------------------------------------------

    def api_machines(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = min(int(q.get("limit", "100")), API_LIMIT)
        except ValueError:
            raise ValueError("limit must be an integer") from None
        if limit < 1:
            raise ValueError("limit must be >= 1")
        ids = self.list_ids(
            q.get("prefix", ""), q.get("selector", "").strip(), q.get("after") or None, limit
        )
        return JSONResponse({"ids": ids})

    def api_machine(self, request: Request) -> Response:
        return JSONResponse(self.machine(_id(request)))

    def api_history(self, request: Request) -> Response:
        id = _id(request)
        info = self.machine(id)
        line = timeline(self.app, id, info["state"])
        return JSONResponse({"id": id, "history": line.entries, "note": line.note})

    def api_failed(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "10000"))
        except ValueError:
            raise ValueError("limit must be an integer") from None
        if limit < 1:
            raise ValueError("limit must be >= 1")
        return JSONResponse({"failed": self.app.failed(limit=limit)})

    async def api_retry(self, request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            raise ValueError('the body must be JSON: {"id": "..."} or {}') from None
        if not isinstance(payload, dict) or not isinstance(payload.get("id", ""), str | None):
            raise ValueError('the body must be {"id": "<machine id>"} or {} for all')
        id = payload.get("id") or None
        return JSONResponse({"retried": await run_in_threadpool(self.app.retry, id)})


def build(source: AppSource, token: str | None, *, loopback_only: bool = False) -> ASGIApp:
    """The inspector as an ASGI app: routes, error pages, the guard around them."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("token must be a non-empty string (or None for no token)")
    views = Inspector(source, token)
    routes = [
        Route("/", views.machines_page),
        Route("/machines/{id}", views.machine_page),
        Route("/failed", views.failed_page),
        Route("/retry", views.retry_form, methods=["POST"]),
        Route("/login", views.login_get, methods=["GET"]),
        Route("/login", views.login_post, methods=["POST"]),
        Route("/logout", views.logout, methods=["POST"]),
        Route("/api/machines", views.api_machines),
        Route("/api/machines/{id}", views.api_machine),
        Route("/api/machines/{id}/history", views.api_history),
        Route("/api/failed", views.api_failed),
        Route("/api/retry", views.api_retry, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    web = Starlette(
        routes=routes,
        exception_handlers={
            CasernError: views.error,
            InvalidId: views.error,
            ValueError: views.error,
            HTTPException: views.error,
        },
    )
    # EncodedIds first: the guard's login page then sends a browser back to the same id.
    guard = Guard(web, token, loopback_only=loopback_only, login_page=views.login_page)
    return EncodedIds(guard)
