"""A FastAPI front for conversations stored in casern, timers included.

    POST /conversations/{id}/messages   {"text": "hi"}  -> 200 with the state
                                        invalid body or id -> 400 {"error": ...}
    GET  /conversations/{id}                             -> 200 with the state, or 404

`{id}` may contain "/" (as is or as %2F): casern keeps such ids exactly.

Run it with `uvicorn examples.fastapi_app:api`. The lifespan handler starts casern's
scheduler on the server's event loop (`astart`), so timers fire in this process;
`await app.asend(...)` lets many requests' changes share one commit.

The casern inspector is mounted at /inspector (ASGI); set INSPECTOR_TOKEN wherever
the API is reachable by others, and it asks for that token.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import casern
import casern.inspector

from . import conversations

STORE = os.environ.get("CONVERSATIONS_STORE", "sqlite:///conversations.db")


def casern_app(store: str = STORE) -> casern.Casern:
    """The casern app behind the API (a factory: `casern --store` can re-point it)."""
    return conversations.make_app(store)


def create_api(factory: Callable[[], casern.Casern] = casern_app) -> FastAPI:
    """The FastAPI app; `factory()` makes the casern app when the server starts."""

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        machines = factory()
        api.state.machines = machines
        await machines.astart()
        try:
            yield
        finally:
            await machines.astop()
            machines.close()

    api = FastAPI(title="conversations", lifespan=lifespan)
    # The inspector, at /inspector/: the casern app is built at startup, so it gets a
    # function that returns it.
    api.mount(
        "/inspector",
        casern.inspector.asgi(lambda: api.state.machines, token=os.environ.get("INSPECTOR_TOKEN")),
    )

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @api.post("/conversations/{id:path}/messages")
    async def post_message(id: str, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error(400, 'the body must be a JSON object like {"text": "hi"}')
        try:
            return await request.app.state.machines.asend(
                "message", id, {**body, "now": time.time()}
            )
        except (casern.InvalidData, casern.InvalidId) as e:
            return error(400, str(e))
        except casern.StoreUnavailable:
            return error(503, "the database is unavailable; try again shortly")

    @api.get("/conversations/{id:path}")
    async def get_conversation(id: str, request: Request) -> Any:
        try:
            state = await request.app.state.machines.aget(id)
        except casern.InvalidId as e:
            return error(400, str(e))
        if state is None:
            return error(404, f"no conversation {id!r}")
        return state

    return api


api = create_api()
