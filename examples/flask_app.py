"""A Flask front for conversations stored in casern.

    POST /conversations/<id>/messages   {"text": "hi"}  -> 200 with the state
                                        invalid body or id -> 400 {"error": ...}
    GET  /conversations/<id>                             -> 200 with the state, or 404

`<id>` may contain "/" (as is or as %2F): casern keeps such ids exactly.

Run the web app, and the timers in a separate worker process::

    flask --app examples.flask_app run
    casern --app examples.flask_app:casern_app worker

Flask serves each request in a thread; `send` is thread-safe and blocks only until
the change is committed, so a view can call it directly.

The casern inspector is mounted at /inspector (WSGI); set INSPECTOR_TOKEN wherever
the app is reachable by others, and it asks for that token.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import casern
import casern.inspector

from . import conversations

STORE = os.environ.get("CONVERSATIONS_STORE", "sqlite:///conversations.db")


def casern_app(store: str = STORE) -> casern.Casern:
    """The casern app behind the web app (a factory: `casern --store` can re-point it)."""
    return conversations.make_app(store)


def create_app(machines: casern.Casern | None = None) -> Flask:
    """The Flask app, serving `machines` (by default `casern_app()`)."""
    web = Flask(__name__)
    app = machines if machines is not None else casern_app()
    web.extensions["casern"] = app

    @web.post("/conversations/<path:id>/messages")
    def post_message(id: str) -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error='the body must be a JSON object like {"text": "hi"}'), 400
        try:
            state = app.send("message", id, {**body, "now": time.time()})
        except (casern.InvalidData, casern.InvalidId) as e:
            return jsonify(error=str(e)), 400
        return jsonify(state)

    @web.get("/conversations/<path:id>")
    def get_conversation(id: str) -> Any:
        try:
            state = app.get(id)
        except casern.InvalidId as e:
            return jsonify(error=str(e)), 400
        if state is None:
            return jsonify(error=f"no conversation {id!r}"), 404
        return jsonify(state)

    # The inspector: a web page to look into the machines, at /inspector/.
    inspector = casern.inspector.wsgi(app, token=os.environ.get("INSPECTOR_TOKEN"))
    web.wsgi_app = DispatcherMiddleware(web.wsgi_app, {"/inspector": inspector})

    @web.errorhandler(casern.StoreUnavailable)
    def store_unavailable(e: Exception) -> Any:
        return jsonify(error="the database is unavailable; try again shortly"), 503

    return web
