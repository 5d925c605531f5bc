"""The one casern app of this process: made on first use (at start-up by wsgi.py and
asgi.py), closed at exit. Django has no shutdown hook, so `atexit` closes it: listeners
under way finish within `close()`'s timeout.

`casern_app` is also the factory `casern --app examples.django_app.machines:casern_app
worker` runs beside the web server; both read the store from CONVERSATIONS_STORE.
"""

from __future__ import annotations

import atexit
import os
import threading

import casern

from .. import conversations

_lock = threading.Lock()
_app: casern.Casern | None = None


def casern_app(store: str | None = None) -> casern.Casern:
    """A new casern app on `store` (default: $CONVERSATIONS_STORE, idle: $CONVERSATIONS_IDLE)."""
    return conversations.make_app(
        store or os.environ.get("CONVERSATIONS_STORE", "sqlite:///conversations.db"),
        idle=float(os.environ.get("CONVERSATIONS_IDLE", "300")),
    )


def machines() -> casern.Casern:
    """This process's casern app, made once (thread-safe) and closed at interpreter exit."""
    global _app
    with _lock:
        if _app is None:
            _app = casern_app()
            atexit.register(_app.close)
        return _app
