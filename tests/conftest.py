"""Fixtures shared by the whole suite: one contract, every store.

`store_url` is parametrized over SQLite and CouchDB, so every test that uses it
(directly or through `make_app`) runs against both. The CouchDB server is a
real pouchdb-server started on a free loopback port for the session (or the
Apache CouchDB named by CASERN_COUCHDB_URL).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import casern
from _process import take_ctrl_c

STORES = ["sqlite", pytest.param("couchdb", marks=pytest.mark.couchdb)]


def pytest_configure(config: pytest.Config) -> None:
    take_ctrl_c()  # the tests' Ctrl-C reaches the servers they start, however pytest runs


@pytest.fixture(scope="session")
def couchdb_base_url() -> Iterator[str]:
    from _couch import couchdb_server

    with couchdb_server() as url:
        yield url


def fresh_couch_db(base: str) -> str:
    return f"{base.rstrip('/')}/casern-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(store_kind: str, tmp_path: Any, request: pytest.FixtureRequest) -> str:
    if store_kind == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return fresh_couch_db(request.getfixturevalue("couchdb_base_url"))


def inc(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    """The reducer most tests use: count sends, remember the last data."""
    state["n"] = state.get("n", 0) + 1
    if data is not None:
        state["last"] = data
    return state


@pytest.fixture
def make_app(store_url: str) -> Iterator[Callable[..., casern.Casern]]:
    """Build apps on this test's store; all are closed at the end of the test."""
    apps: list[casern.Casern] = []

    def make(
        reducers: dict[str, Any] | None = None,
        listeners: dict[str, Any] | None = None,
        *,
        preferences: dict[str, Any] | None = None,
        services: dict[str, Any] | None = None,
        **options: Any,
    ) -> casern.Casern:
        options.setdefault(
            "backoff", casern.Backoff(attempts=3, initial=0.01, maximum=0.05, timeout=5)
        )
        app = casern.Casern(
            options.pop("store", store_url),
            preferences or {},
            services or {},
            reducers if reducers is not None else {"inc": inc},
            listeners or {},
            **options,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
