"""A sync view calling `send` and an async view calling `await asend`.

`send` is thread-safe and blocks only until the change is committed; `asend` awaits
the same commit without holding a thread, and concurrent ones share a commit.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

import casern

from .machines import machines


def _body(request: HttpRequest) -> dict[str, Any] | JsonResponse:
    try:
        body = json.loads(request.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return JsonResponse(
            {"error": 'the body must be a JSON object like {"text": "hi"}'}, status=400
        )
    return {**body, "now": time.time()}  # reducers never read the clock


def _refused(e: casern.CasernError) -> JsonResponse:
    if isinstance(e, casern.StoreUnavailable):
        return JsonResponse({"error": "the database is unavailable; try again shortly"}, status=503)
    return JsonResponse({"error": str(e)}, status=400)


@require_POST
def post_message(request: HttpRequest, id: str) -> JsonResponse:
    data = _body(request)
    if isinstance(data, JsonResponse):
        return data
    try:
        return JsonResponse(machines().send("message", id, data))
    except (casern.InvalidData, casern.InvalidId, casern.StoreUnavailable) as e:
        return _refused(e)


@require_POST
async def apost_message(request: HttpRequest, id: str) -> JsonResponse:
    data = _body(request)
    if isinstance(data, JsonResponse):
        return data
    try:
        return JsonResponse(await machines().asend("message", id, data))
    except (casern.InvalidData, casern.InvalidId, casern.StoreUnavailable) as e:
        return _refused(e)


@require_GET
def get_conversation(request: HttpRequest, id: str) -> JsonResponse:
    try:
        state = machines().get(id)
    except (casern.InvalidId, casern.StoreUnavailable) as e:
        return _refused(e)
    if state is None:
        return JsonResponse({"error": f"no conversation {id!r}"}, status=404)
    return JsonResponse(state)
