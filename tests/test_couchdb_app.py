"""CouchDB-only promises of the whole app: a server that goes away, comes back, is shared.

These tests own their pouchdb-server (with LevelDB files, so a restart keeps the
data), because they stop and restart it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import casern
from _couch import PouchServer, db_url, fresh_db_name
from conftest import inc

pytestmark = pytest.mark.couchdb


@pytest.fixture
def server() -> Iterator[PouchServer]:
    with PouchServer(in_memory=False) as s:
        yield s


def make(url: str, **options: Any) -> casern.Casern:
    return casern.Casern(url, {}, {}, {"inc": inc}, options.pop("listeners", {}), **options)


def test_server_gone_gives_store_unavailable_and_recovers_when_back(server: PouchServer) -> None:
    url = db_url(server.base_url, fresh_db_name())
    seen: list[int] = []
    with make(url, listeners={"spy": lambda c: seen.append(c.seq)}) as app:
        assert app.send("inc", "a") == {"n": 1}
        server.stop()
        started = time.monotonic()
        with pytest.raises(casern.StoreUnavailable, match=r"127\.0\.0\.1"):
            app.send("inc", "a")
        assert time.monotonic() - started < 60  # bounded retries, not a hang
        with pytest.raises(casern.StoreUnavailable):
            app.get("a")
        server.start()
        assert app.get("a") == {"n": 1}  # nothing partial was written
        assert app.send("inc", "a") == {"n": 2}  # the same app recovers, no restart
        assert app.drain(30)
        assert seen == [1, 2]
        assert [h["seq"] for h in app.history("a")] == [1, 2]


def test_server_restarted_mid_traffic_loses_no_committed_update(server: PouchServer) -> None:
    url = db_url(server.base_url, fresh_db_name())
    committed: list[int] = []
    errors: list[BaseException] = []
    with make(url) as app:

        def traffic() -> None:
            for _ in range(60):
                try:
                    committed.append(app.send("inc", "hot")["n"])
                except casern.StoreUnavailable as e:
                    errors.append(e)
                time.sleep(0.01)

        t = threading.Thread(target=traffic)
        t.start()
        time.sleep(0.2)
        server.restart()
        t.join(120)
        final = app.get("hot")
        assert final is not None
        # every send that returned a state is in the store, in order
        assert committed == sorted(committed) and len(set(committed)) == len(committed)
        assert committed and committed[-1] <= final["n"]
        assert [h["seq"] for h in app.history("hot")] == list(range(1, final["n"] + 1))


def test_two_apps_on_one_database_lose_no_update(couchdb_base_url: str) -> None:
    url = db_url(couchdb_base_url, fresh_db_name())
    with make(url) as one, make(url) as two:
        threads = [
            threading.Thread(target=lambda a=a: [a.send("inc", "shared") for _ in range(20)])
            for a in (one, two, one, two)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert one.get("shared") == two.get("shared") == {"n": 80}
        assert [h["seq"] for h in two.history("shared")] == list(range(1, 81))


def test_credentials_never_appear_in_reprs_messages_or_logs(caplog: Any) -> None:
    with PouchServer(admins={"admin": "s3cret-pw"}) as server:
        good = db_url(
            server.base_url.replace("http://", "http://admin:s3cret-pw@"), fresh_db_name()
        )
        with caplog.at_level(logging.DEBUG):
            with make(good) as app:
                assert app.send("inc", "a") == {"n": 1}
                texts = [repr(app), repr(app.store), str(app.store.url)]
                server.stop()
                with pytest.raises(casern.StoreUnavailable) as info:
                    app.send("inc", "a")
                texts.append(str(info.value))
                texts.append(repr(info.value))
                cause = info.value.__cause__
                while cause is not None:
                    texts.append(str(cause))
                    cause = cause.__cause__
                server.start()
            bad = good.replace("s3cret-pw", "wr0ng-pw")
            with pytest.raises(casern.CasernError) as refused:
                make(bad).send("inc", "b")
            texts.append(str(refused.value))
        texts.append(caplog.text)
        for text in texts:
            assert "s3cret-pw" not in text and "wr0ng-pw" not in text


def test_close_returns_while_the_server_is_gone_and_nothing_is_lost(server: PouchServer) -> None:
    url = db_url(server.base_url, fresh_db_name())
    seen: list[int] = []

    def slow(c: casern.Change) -> None:
        time.sleep(0.5)  # acknowledged only once the server is gone
        seen.append(c.seq)

    app = make(url, listeners={"spy": slow})
    app.send("inc", "a")
    app.send("inc", "a")
    server.stop()
    started = time.monotonic()
    app.close(timeout=1)  # the acknowledgements cannot be written
    assert time.monotonic() - started < 60
    server.start()
    again: list[int] = []
    with make(url, listeners={"spy": lambda c: again.append(c.seq)}, redeliver_after=0) as app2:
        app2.run_once()
        assert app2.drain(30)
        assert app2.get("a") == {"n": 2}
    assert sorted(set(seen) | set(again)) == [1, 2]
