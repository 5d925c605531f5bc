"""`<path:id>` so that ids with "/" (which casern keeps) are reachable."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("conversations/<path:id>/messages", views.post_message),
    path("async/conversations/<path:id>/messages", views.apost_message),
    path("conversations/<path:id>", views.get_conversation),
]
