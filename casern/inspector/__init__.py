"""The inspector: a web page (and JSON API) to look into a casern app's machines.

    casern --app mymodule:app inspect              # http://127.0.0.1:8000/

or mounted into an existing web app::

    api.mount("/inspector", casern.inspector.asgi(app, token="..."))          # FastAPI
    DispatcherMiddleware(flask.wsgi_app, {"/inspector": casern.inspector.wsgi(app)})

`app` is a `casern.Casern`, or a function returning one (called per request:
handy when the app is built at startup). With `token`, every request needs
`Authorization: Bearer <token>` or the cookie set by the login form. Without
one, the mount is open: put it behind your own authentication.
"""

from __future__ import annotations

from a2wsgi import ASGIMiddleware
from a2wsgi.wsgi_typing import WSGIApp
from starlette.types import ASGIApp

from ._web import AppSource, build

__all__ = ["asgi", "wsgi"]


def asgi(app: AppSource, token: str | None = None) -> ASGIApp:
    """The inspector as an ASGI app, to mount into Starlette, FastAPI or any ASGI server."""
    return build(app, token)


def wsgi(app: AppSource, token: str | None = None) -> WSGIApp:
    """The inspector as a WSGI app, to mount into Flask, Django or any WSGI server.

    The WSGI server must pass the raw request URI (`REQUEST_URI` or `RAW_URI`:
    Werkzeug, gunicorn, uWSGI and mod_wsgi do) for ids that contain `/`.
    """
    return ASGIMiddleware(build(app, token))  # type: ignore[arg-type]
