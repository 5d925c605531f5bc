"""The WSGI app (gunicorn, `manage.py runserver`): Django, with the inspector at /inspector/.

Set INSPECTOR_TOKEN wherever the site is reachable by others, and it asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from django.core.wsgi import get_wsgi_application

import casern.inspector

from .machines import machines

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
django_app = get_wsgi_application()
inspector = casern.inspector.wsgi(machines(), token=os.environ.get("INSPECTOR_TOKEN"))


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Route /inspector to the inspector (as its SCRIPT_NAME), the rest to Django."""
    path = environ.get("PATH_INFO", "")
    if path == "/inspector" or path.startswith("/inspector/"):
        environ = {
            **environ,
            "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + "/inspector",
            "PATH_INFO": path[len("/inspector") :],
        }
        return inspector(environ, start_response)  # type: ignore[arg-type]
    return django_app(environ, start_response)
