"""CouchDBStore against a real CouchDB-compatible server (pouchdb-server, or CASERN_COUCHDB_URL)."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from _couch import ENV_URL, PouchServer, couchdb_server, db_url, free_port
from casern._errors import InvalidId, StoreUnavailable
from casern.stores.base import Write
from casern.stores.couchdb import TOKEN, CouchDBStore

pytestmark = pytest.mark.couchdb

needs_pouch = pytest.mark.skipif(
    bool(os.environ.get(ENV_URL)), reason="starts its own pouchdb-server"
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with couchdb_server() as url:
        yield url


@pytest.fixture
def store(base_url: str) -> Iterator[CouchDBStore]:
    s = CouchDBStore(db_url(base_url))
    yield s
    s.close()


def raw(store: CouchDBStore) -> httpx.Client:
    """A plain client on the same server, to look behind the store's back."""
    return httpx.Client(
        base_url=str(store._client.base_url),
        headers={"Accept": "application/json"},
        auth=store._client.auth,
    )


def raw_ids(store: CouchDBStore, db: str | None = None) -> list[str]:
    with raw(store) as c:
        resp = c.get(f"{db or store._db}/_all_docs", params={"endkey": json.dumps("\U0010ffff")})
        if resp.status_code == 404:
            return []
        return [r["id"] for r in resp.json()["rows"]]


def env(state: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"state": state or {}, "seq": 1, "version": 1, **fields}


# -- basic writes -------------------------------------------------------------


def test_create_get_update(store: CouchDBStore) -> None:
    assert store.get("m1") is None
    [rev] = store.put_many([Write("m1", None, env({"n": 1}))])
    assert rev
    rec = store.get("m1")
    assert rec is not None and rec.id == "m1" and rec.rev == rev
    assert rec.doc == env({"n": 1})  # no _id, _rev, nor our write token
    [rev2] = store.put_many([Write("m1", rev, env({"n": 2}, seq=2))])
    assert rev2 and rev2 != rev
    assert store.get("m1").doc["state"] == {"n": 2}  # type: ignore[union-attr]


def test_create_existing_is_a_conflict(store: CouchDBStore) -> None:
    [rev] = store.put_many([Write("m", None, env({"n": 1}))])
    assert store.put_many([Write("m", None, env({"n": 2}))]) == [None]
    rec = store.get("m")
    assert rec is not None and rec.rev == rev and rec.doc["state"] == {"n": 1}


def test_stale_rev_is_a_conflict(store: CouchDBStore) -> None:
    [r1] = store.put_many([Write("m", None, env({"n": 1}))])
    [r2] = store.put_many([Write("m", r1, env({"n": 2}))])
    assert store.put_many([Write("m", r1, env({"n": 3}))]) == [None]
    assert store.get("m").rev == r2  # type: ignore[union-attr]


def test_bulk_partial_conflicts(store: CouchDBStore) -> None:
    revs = store.put_many([Write(f"m{i}", None, env({"i": i})) for i in range(4)])
    assert all(revs)
    writes = [
        Write("m0", revs[0], env({"i": 10})),
        Write("m1", "1-00000000000000000000000000000000", env({"i": 11})),  # stale
        Write("m2", revs[2], env({"i": 12})),
        Write("m3", None, env({"i": 13})),  # exists
        Write("new", None, env({"i": 14})),
    ]
    out = store.put_many(writes)
    assert out[1] is None and out[3] is None
    assert all(out[i] for i in (0, 2, 4))
    got = store.get_many(["m0", "m1", "m2", "m3", "new"])
    assert [got[k].doc["state"]["i"] for k in ("m0", "m1", "m2", "m3", "new")] == [10, 1, 12, 3, 14]


def test_same_id_twice_in_one_batch(store: CouchDBStore) -> None:
    out = store.put_many([Write("d", None, env({"a": 1})), Write("d", None, env({"a": 2}))])
    assert sorted(out, key=lambda r: r is None)[1] is None and any(out)


def test_get_many_missing_and_large(store: CouchDBStore) -> None:
    assert store.get_many([]) == {}
    assert store.put_many([]) == []
    ids = [f"id-{i:05d}" for i in range(1200)]  # more than one chunk each way
    revs = store.put_many([Write(i, None, env({"i": i})) for i in ids])
    assert all(revs)
    got = store.get_many([*ids, "nope", "id-00001", "also-missing"])
    assert set(got) == set(ids)
    assert got["id-01199"].doc["state"] == {"i": "id-01199"}
    assert store.get_many(["nope"]) == {}


def test_record_doc_has_no_bookkeeping(store: CouchDBStore) -> None:
    store.put_many([Write("k", None, {**env(), TOKEN: "forged"})])
    rec = store.get("k")
    assert rec is not None and set(rec.doc) == {"state", "seq", "version"}
    with raw(store) as c:
        body = c.post(
            f"{store._db}/_all_docs", params={"include_docs": "true"}, json={"keys": ["k"]}
        ).json()
    assert body["rows"][0]["doc"][TOKEN] != "forged"


# -- index queries --------------------------------------------------------------


def test_due_pending_failed(store: CouchDBStore) -> None:
    docs = {
        "d5": env(next_due=5.0),
        "d1": env(next_due=1.0, pending_since=7.0),
        "d3": env(next_due=3.5, pending_since=2.0, nfailed=1),
        "dneg": env(next_due=-2.0),
        "dnull": env(next_due=None, pending_since=None, nfailed=0),
        "dnone": env(),
        "dlate": env(next_due=100.0, pending_since=100.0, nfailed=3),
    }
    assert all(store.put_many([Write(k, None, v) for k, v in docs.items()]))
    assert store.due(4.0, 10) == ["dneg", "d1", "d3"]
    assert store.due(4.0, 2) == ["dneg", "d1"]
    assert store.due(5.0, 10) == ["dneg", "d1", "d3", "d5"]
    assert store.due(-10.0, 10) == []
    assert store.due(1000.0, 0) == []
    assert store.pending(10.0, 10) == ["d3", "d1"]
    assert store.pending(1.0, 10) == []
    assert store.pending(1e12, 1) == ["d3"]
    assert sorted(store.failed(10)) == ["d3", "dlate"]
    assert len(store.failed(1)) == 1


def test_due_follows_updates(store: CouchDBStore) -> None:
    [rev] = store.put_many([Write("t", None, env(next_due=1.0))])
    assert store.due(2.0, 10) == ["t"]
    store.put_many([Write("t", rev, env(next_due=None))])
    assert store.due(2.0, 10) == []


# -- listing --------------------------------------------------------------------


def test_ids_paging_and_prefix(store: CouchDBStore) -> None:
    ids = ["a", "a/1", "a/2", "a/3", "ab", "b", "b/1", "é", "日本語", "Ａ", "\U0001f600"]
    store.put_many([Write(i, None, env()) for i in ids])
    everything = store.ids()
    assert sorted(everything) == sorted(ids)  # no _design/ docs, nothing above U+00FF lost
    assert store.ids(prefix="a/") == ["a/1", "a/2", "a/3"]
    assert store.ids(prefix="a/", limit=2) == ["a/1", "a/2"]
    assert store.ids(prefix="a/", after="a/2") == ["a/3"]
    assert store.ids(prefix="a/", after="a/3") == []
    assert store.ids(prefix="a/", after="0") == ["a/1", "a/2", "a/3"]  # after below the prefix
    assert store.ids(prefix="a/", after="z") == []
    assert store.ids(prefix="日") == ["日本語"]
    assert store.ids(prefix="zzz") == []
    assert store.ids(limit=0) == []
    # Page through everything, one at a time, the way `casern ls` would.
    seen: list[str] = []
    after = None
    while page := store.ids(after=after, limit=3):
        seen += page
        after = page[-1]
    assert seen == everything


# -- history --------------------------------------------------------------------


def entry(seq: int, **kw: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "reducer": "r",
        "data": {"n": seq},
        "key": None,
        "applied_at": "t",
        "version": 1,
        **kw,
    }


def test_history_idempotent_ordered(store: CouchDBStore) -> None:
    assert store.history("h") == []
    store.put_history("h", [entry(1), entry(2)])
    store.put_history("h", [entry(2), entry(3)])  # overlap: idempotent
    store.put_history("h", [entry(10), entry(11)])
    store.put_history("h", [])
    assert [e["seq"] for e in store.history("h")] == [1, 2, 3, 10, 11]
    assert store.history("h")[0] == entry(1)  # exactly what was written
    assert [e["seq"] for e in store.history("h", after=2)] == [3, 10, 11]
    assert [e["seq"] for e in store.history("h", after=2, limit=2)] == [3, 10]
    assert store.history("h", after=11) == []


def test_history_long(store: CouchDBStore) -> None:
    store.put_history("long", [entry(i) for i in range(1, 2502)])
    assert [e["seq"] for e in store.history("long")] == list(range(1, 2502))
    assert [e["seq"] for e in store.history("long", after=999, limit=1500)] == list(
        range(1000, 2500)
    )


def test_history_per_machine_isolation(store: CouchDBStore) -> None:
    ids = ["a", "a b", "ab", "a/b", "a0", "b", "a:"]
    for n, i in enumerate(ids):
        store.put_history(i, [entry(s, who=i) for s in range(1, n + 2)])
    for n, i in enumerate(ids):
        hist = store.history(i)
        assert [e["seq"] for e in hist] == list(range(1, n + 2)), i
        assert {e["who"] for e in hist} == {i}
    assert raw_ids(store) == [
        d for d in raw_ids(store) if d.startswith("_design/")
    ]  # envelopes untouched


# -- hostile ids ----------------------------------------------------------------

HOSTILE = [
    "a/b",
    "a?b",
    "a#b",
    "../x",
    "..",
    ".",
    "a b",
    "日本語",
    "%2F",
    "a%2Fb",
    "x" * 1024,
    "design/x",
    "a\\b",
    "?rev=1",
    "&include_docs=true",
    '"quoted"',
    "\U0001f600",
]


def test_hostile_ids_round_trip(store: CouchDBStore, base_url: str) -> None:
    with raw(store) as c:
        dbs_before = set(c.get(f"{base_url}/_all_dbs").json())
    revs = store.put_many([Write(i, None, env({"id": i})) for i in HOSTILE])
    assert all(revs)
    got = store.get_many(HOSTILE)
    assert set(got) == set(HOSTILE)
    for i in HOSTILE:
        assert got[i].doc["state"] == {"id": i}
        store.put_history(i, [entry(1, id=i)])
        assert store.history(i) == [entry(1, id=i)]
    assert sorted(store.ids()) == sorted(HOSTILE)
    # Exactly these documents, nothing elsewhere.
    assert sorted(d for d in raw_ids(store) if not d.startswith("_design/")) == sorted(HOSTILE)
    with raw(store) as c:
        dbs_after = set(c.get(f"{base_url}/_all_dbs").json())
    assert dbs_after - dbs_before <= {store._db.lstrip("/"), store._hdb.lstrip("/")}


@pytest.mark.parametrize(
    "bad",
    [
        "_design/x",
        "_local/x",
        "_all_docs",
        "_users",
        "",
        "a\nb",
        "a\x00b",
        "\x1f",
        "x" * 1025,
        42,
        None,
    ],
)
def test_refused_ids(store: CouchDBStore, bad: Any) -> None:
    with pytest.raises(InvalidId):
        store.put_many([Write(bad, None, env())])
    with pytest.raises(InvalidId):
        store.get_many([bad])
    with pytest.raises(InvalidId):
        store.put_history(bad, [entry(1)])
    with pytest.raises(InvalidId):
        store.history(bad)
    # Nothing was created: only our own index design documents exist.
    assert all(d.startswith("_design/casern-") for d in raw_ids(store))


def test_design_prefix_not_listed(store: CouchDBStore) -> None:
    store.put_many([Write("x", None, env())])
    assert store.ids(prefix="_design/") == []
    assert store.ids(prefix="_") == []


# -- URL handling, credentials ----------------------------------------------------


def test_bad_urls() -> None:
    with pytest.raises(ValueError, match="database name"):
        CouchDBStore("http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="database name"):
        CouchDBStore("http://user:hunter2-pw@127.0.0.1:1/Bad_Name")
    with pytest.raises(ValueError) as exc:
        CouchDBStore("ftp://user:hunter2-pw@127.0.0.1:1/db")
    assert "hunter2" not in str(exc.value)
    with pytest.raises(ValueError) as exc:
        CouchDBStore("http://user:hunter2/xyz@127.0.0.1:1/db")  # "/" in the password
    assert "hunter2" not in _all_text(exc.value) and "xyz" not in _all_text(exc.value)


def _all_text(exc: BaseException | None) -> str:
    """Every message in the exception chain (what a traceback would print)."""
    text = ""
    while exc is not None:
        text += "".join(traceback.format_exception_only(exc)) + repr(exc) + repr(exc.args)
        exc = exc.__cause__ or exc.__context__
    return text


@needs_pouch
def test_credentials_never_shown() -> None:
    with PouchServer(admins={"alice": "s3cret-pw"}) as server:
        url = f"http://alice:s3cret-pw@127.0.0.1:{server.port}/creds-db"
        store = CouchDBStore(url, retries=1)
        try:
            assert store.url == f"http://***@127.0.0.1:{server.port}/creds-db"
            assert "s3cret" not in repr(store) and "alice" not in repr(store)
            assert store.put_many([Write("a", None, env())])[0]
            server.stop()
            with pytest.raises(StoreUnavailable) as down:
                store.get("a")
            assert "s3cret" not in _all_text(down.value)
            assert "***@127.0.0.1" in str(down.value)
        finally:
            store.close()
        server.start()
        with pytest.raises(StoreUnavailable) as wrong:
            CouchDBStore(f"http://alice:wr0ng-pw@127.0.0.1:{server.port}/creds-db")
        text = _all_text(wrong.value)
        assert "wr0ng" not in text and "401" in text and "password" in text
        assert ".;" not in str(wrong.value)  # the server's reason ends in a full stop


def test_unreachable_is_bounded() -> None:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="check that the server is running"):
        CouchDBStore(f"http://u:pw-secret@127.0.0.1:{_closed_port()}/db", retries=3)
    assert time.monotonic() - t0 < 5


def _closed_port() -> int:
    return free_port()


# -- server down and back ---------------------------------------------------------


@needs_pouch
@pytest.mark.parametrize("in_memory", [True, False])
def test_server_stop_and_restart(in_memory: bool) -> None:
    with PouchServer(in_memory=in_memory) as server:
        store = CouchDBStore(db_url(server.base_url), retries=3)
        try:
            [rev] = store.put_many([Write("m", None, env({"n": 1}), history=())])
            server.stop()
            for call in (
                lambda: store.get("m"),
                lambda: store.put_many([Write("m", rev, env({"n": 2}))]),
                lambda: store.due(1e12, 10),
                lambda: store.history("m"),
            ):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    call()
                assert time.monotonic() - t0 < 5
            server.start()  # same port
            rec = store.get("m")
            if in_memory:  # all data gone; the database and indexes come back
                assert rec is None
                assert store.put_many([Write("m", None, env(next_due=1.0))])[0]
                assert store.due(2.0, 10) == ["m"]
            else:
                assert rec is not None and rec.rev == rev
                assert store.put_many([Write("m", rev, env({"n": 2}))])[0]
        finally:
            store.close()


# -- retried writes are applied once ------------------------------------------------


class Flaky(httpx.BaseTransport):
    """Forwards requests; `fault(request)` may raise before or after forwarding."""

    def __init__(
        self, fault: Callable[[httpx.Request, Callable[[], httpx.Response]], httpx.Response]
    ) -> None:
        self.inner = httpx.HTTPTransport()
        self.fault = fault
        self.calls: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        return self.fault(request, lambda: self.inner.handle_request(request))

    def close(self) -> None:
        self.inner.close()


def _once_on_bulk(
    action: str,
) -> Callable[[httpx.Request, Callable[[], httpx.Response]], httpx.Response]:
    done = []

    def fault(request: httpx.Request, forward: Callable[[], httpx.Response]) -> httpx.Response:
        if request.url.path.endswith("/_bulk_docs") and not done:
            done.append(1)
            if action == "refuse":
                raise httpx.ConnectError("connection refused (simulated)")
            if action == "503":
                return httpx.Response(503, json={"error": "unavailable"})
            resp = forward()
            resp.read()
            raise httpx.ReadError("connection reset after sending (simulated)")
        return forward()

    return fault


@pytest.mark.parametrize("action", ["landed", "refuse", "503"])
def test_retry_after_transport_error_applies_once(base_url: str, action: str) -> None:
    url = db_url(base_url)
    CouchDBStore(url).close()  # create the database without faults
    setup = CouchDBStore(url)
    [old] = setup.put_many([Write("u", None, env({"n": 1}))])
    transport = Flaky(_once_on_bulk(action))
    store = CouchDBStore(url, transport=transport)
    try:
        out = store.put_many([Write("u", old, env({"n": 2})), Write("c", None, env({"n": 1}))])
        assert all(out)
        got = store.get_many(["u", "c"])
        assert got["u"].rev == out[0] and got["c"].rev == out[1]
        assert got["u"].rev.startswith("2-") and got["c"].rev.startswith("1-")  # each applied once
        assert got["u"].doc["state"] == {"n": 2}
        assert transport.calls.count(store._db + "/_bulk_docs") == (1 if action == "landed" else 2)
    finally:
        store.close()
        setup.close()


def test_retry_sees_landed_write_that_was_overwritten(base_url: str) -> None:
    """Ours landed, the answer was lost, then another writer wrote on top: still ours."""
    url = db_url(base_url)
    other = CouchDBStore(url)
    [old] = other.put_many([Write("u", None, env({"n": 1}))])

    done: list[int] = []

    def fault(request: httpx.Request, forward: Callable[[], httpx.Response]) -> httpx.Response:
        if request.url.path.endswith("/_bulk_docs") and not done:
            done.append(1)
            resp = forward()
            resp.read()
            [landed] = json.loads(resp.content)
            assert other.put_many([Write("u", landed["rev"], env({"n": 3}))])[0]
            raise httpx.RemoteProtocolError("server disconnected (simulated)")
        return forward()

    store = CouchDBStore(url, transport=Flaky(fault))
    try:
        [rev] = store.put_many([Write("u", old, env({"n": 2}))])
        assert rev is not None and rev.startswith("2-")  # ours landed: not a conflict
        rec = store.get("u")
        assert rec is not None and rec.rev.startswith("3-") and rec.doc["state"] == {"n": 3}
    finally:
        store.close()
        other.close()


def test_retry_reports_conflict_when_another_write_won(base_url: str) -> None:
    """The connection died before ours arrived and another writer got there first."""
    url = db_url(base_url)
    other = CouchDBStore(url)
    [old] = other.put_many([Write("u", None, env({"n": 1}))])
    done: list[int] = []

    def fault(request: httpx.Request, forward: Callable[[], httpx.Response]) -> httpx.Response:
        if request.url.path.endswith("/_bulk_docs") and not done:
            done.append(1)
            assert other.put_many([Write("u", old, env({"n": 3}))])[0]
            raise httpx.WriteError("broken pipe (simulated)")  # ours never sent
        return forward()

    store = CouchDBStore(url, transport=Flaky(fault))
    try:
        assert store.put_many([Write("u", old, env({"n": 2}))]) == [None]
        assert store.get("u").doc["state"] == {"n": 3}  # type: ignore[union-attr]
    finally:
        store.close()
        other.close()


def test_threads_share_one_store(store: CouchDBStore) -> None:
    """One store, many threads, one id: revisions make every increment count."""
    import threading

    if store.may_fork:
        pytest.skip(
            "on a cluster a revision check alone can fork a document; the engine merges"
            " forks (tests/test_cluster.py checks that no increment is lost there)"
        )

    store.put_many([Write("ctr", None, env({"n": 0}))])
    errors: list[BaseException] = []

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                while True:
                    rec = store.get("ctr")
                    assert rec is not None
                    new = env({"n": rec.doc["state"]["n"] + 1})
                    if store.put_many([Write("ctr", rec.rev, new)])[0]:
                        break
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.get("ctr").doc["state"] == {"n": 150}  # type: ignore[union-attr]
