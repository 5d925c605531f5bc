"""The ASGI app (`uvicorn examples.django_app.asgi:application`), inspector at /inspector/."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application
from starlette.types import Receive, Scope, Send

import casern.inspector

from .machines import machines

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
django_app = get_asgi_application()
inspector = casern.inspector.asgi(machines(), token=os.environ.get("INSPECTOR_TOKEN"))


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """Route /inspector to the inspector (as its root_path), the rest to Django."""
    path = scope.get("path", "")
    if scope["type"] == "http" and (path == "/inspector" or path.startswith("/inspector/")):
        scope = dict(scope, root_path=scope.get("root_path", "") + "/inspector")
        await inspector(scope, receive, send)
    else:
        await django_app(scope, receive, send)
