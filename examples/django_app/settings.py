"""Minimal settings: no database, no sessions; casern holds the state."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []  # a JSON API: no sessions, so no CSRF middleware either
ROOT_URLCONF = "examples.django_app.urls"
WSGI_APPLICATION = "examples.django_app.wsgi.application"  # used by `manage.py runserver`
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
