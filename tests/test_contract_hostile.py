"""Hostile data shapes, on every store: one bad message never fails another.

What a stranger can send (lone surrogates, absurd nesting, numbers no JSON
peer agrees on, states too big for the store) is refused with a clear
`InvalidData` / `InvalidState` naming the JSON path, before anything is
written; and whatever goes wrong with one id's envelope in a group commit
fails that id's actions only.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from test_couchdb_store import Flaky

import casern
from casern._json import MAX_DEPTH, MAX_SAFE_INTEGER, dumps
from casern.stores.base import Store, Write
from casern.stores.couchdb import DEFAULT_MAX_DOCUMENT_SIZE, CouchDBStore
from casern.stores.sqlite import SQLiteStore
from conftest import fresh_couch_db

MakeApp = Callable[..., casern.Casern]


def put(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    """Store the data as the state's `v`."""
    return {**state, "v": data}


def nested(depth: int) -> Any:
    """`depth` lists inside one another: nested(2) == [[]]."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def depth_of(value: Any) -> int:
    n = 0
    while isinstance(value, list):
        n, value = n + 1, value[0] if value else None
    return n


def limited(store_url: str, limit: int) -> Store:
    """The test's store with a smaller document limit."""
    if store_url.startswith("sqlite:"):
        return SQLiteStore(store_url, max_document_size=limit)
    return CouchDBStore(store_url, max_document_size=limit)


# -- lone surrogates --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ("\ud800", "$"),
        ({"text": "hi \udfff there"}, "$.text"),
        ({"msgs": [{"ok": "é"}, {"\ud83d": 1}]}, "$.msgs[1]"),
        ({"a b": ["x", "\udc00"]}, '$["a b"][1]'),
    ],
)
def test_lone_surrogates_in_data_are_invalid_data_naming_the_path(
    make_app: MakeApp, data: Any, path: str
) -> None:
    app = make_app({"put": put})
    with pytest.raises(casern.InvalidData, match="lone surrogate") as refused:
        app.send("put", "m", data)
    assert f"at {path}:" in str(refused.value)
    assert app.get("m") is None


def test_a_lone_surrogate_in_an_idempotency_key_is_invalid_data(make_app: MakeApp) -> None:
    app = make_app({"put": put})
    with pytest.raises(casern.InvalidData, match="lone surrogate"):
        app.send("put", "m", 1, key="k\ud800")
    assert app.get("m") is None


@pytest.mark.parametrize(
    ("state", "path"), [({"v": "\ud800"}, "$.v"), ({"ok": 1, "\udfff": 2}, "$")]
)
def test_a_reducer_returning_lone_surrogates_is_invalid_state(
    make_app: MakeApp, state: dict[str, Any], path: str
) -> None:
    app = make_app({"bad": lambda p, s, d: state, "put": put})
    app.send("put", "m", 1)
    with pytest.raises(casern.InvalidState, match="lone surrogate") as refused:
        app.send("bad", "m")
    assert f"at {path}:" in str(refused.value)
    assert app.get("m") == {"v": 1}
    assert [h["seq"] for h in app.history("m")] == [1]


def test_nul_and_astral_characters_round_trip(make_app: MakeApp) -> None:
    app = make_app({"put": put})
    data = {"nul": "a\x00b", "emoji": "\U0001f600", "key\x00": "\u2028"}
    assert app.send("put", "m", data) == {"v": data}
    assert app.get("m") == {"v": data}


# -- nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 100_000])
def test_data_nested_deeper_than_the_limit_is_invalid_data(make_app: MakeApp, depth: int) -> None:
    app = make_app({"put": put})
    with pytest.raises(casern.InvalidData, match=f"deeper than {MAX_DEPTH} levels"):
        app.send("put", "m", nested(depth))
    assert app.get("m") is None


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_a_reducer_returning_a_state_nested_too_deep_is_invalid_state(
    make_app: MakeApp, depth: int
) -> None:
    app = make_app({"deep": lambda p, s, d: {"d": nested(depth)}})
    with pytest.raises(casern.InvalidState, match=f"deeper than {MAX_DEPTH} levels"):
        app.send("deep", "m")
    assert app.get("m") is None


def test_data_and_state_at_the_nesting_limit_reach_listeners_and_history(
    make_app: MakeApp,
) -> None:
    seen: list[casern.Change] = []
    # The state {"v": data} is one level more than the data: keep both within the limit.
    data = nested(MAX_DEPTH - 1)
    app = make_app({"put": put}, {"watch": seen.append})
    assert depth_of(app.send("put", "m", data)["v"]) == MAX_DEPTH - 1
    assert app.drain(timeout=30)
    assert depth_of(seen[0].data) == depth_of(seen[0].state["v"]) == MAX_DEPTH - 1
    assert depth_of(app.history("m")[0]["data"]) == MAX_DEPTH - 1
    assert depth_of(app.replay("m")["v"]) == MAX_DEPTH - 1


# -- numbers: one rule for every store ------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 1.7976931348623157e308, 2.2250738585072014e-308, 0.1],
)
def test_numbers_every_store_keeps_exactly_round_trip(make_app: MakeApp, number: Any) -> None:
    app = make_app({"put": put})
    app.send("put", "m", {"n": number})
    got = app.get("m")
    assert got is not None and got["v"]["n"] == number


@pytest.mark.parametrize(
    ("number", "why"),
    [
        (MAX_SAFE_INTEGER + 1, "beyond ±"),
        (-(10**400), "beyond ±"),
        (10**400, "beyond ±"),
        (10**5000, "beyond ±"),
        (5e-324, "subnormal"),
        (float("inf"), "Infinity"),
    ],
    ids=["2**53", "-10**400", "10**400", "10**5000", "5e-324", "inf"],
)
def test_numbers_some_store_would_change_are_invalid_data(
    make_app: MakeApp, number: Any, why: str
) -> None:
    app = make_app({"put": put})
    with pytest.raises(casern.InvalidData, match=why) as refused:
        app.send("put", "m", {"list": [1, number]})
    assert "$.list[1]" in str(refused.value)
    assert app.get("m") is None
    assert app.send("put", "m", 1) == {"v": 1}  # the store is fine: no StoreUnavailable


def test_a_reducer_returning_a_huge_integer_is_invalid_state(make_app: MakeApp) -> None:
    app = make_app({"big": lambda p, s, d: {"n": 10**400}})
    with pytest.raises(casern.InvalidState, match=r"at \$\.n: the integer"):
        app.send("big", "m")
    assert app.get("m") is None


def test_negative_zero_is_stored_as_zero_on_every_store(make_app: MakeApp) -> None:
    app = make_app({"put": put})
    for got in (app.send("put", "m", [-0.0, {"z": -0.0}]), app.get("m")):
        assert got is not None
        zeros = [got["v"][0], got["v"][1]["z"]]
        assert zeros == [0, 0] and all(math.copysign(1, z) == 1 for z in zeros)


# -- size -------------------------------------------------------------------------------


def test_a_state_over_the_document_limit_is_refused_before_anything_is_written(
    make_app: MakeApp, store_url: str
) -> None:
    app = make_app({"put": put}, store=limited(store_url, 50_000))
    app.send("put", "m", "small")
    with pytest.raises(casern.InvalidState, match="document limit of 50,000 bytes"):
        app.send("put", "m", "x" * 60_000)
    assert app.get("m") == {"v": "small"}
    assert [h["seq"] for h in app.history("m")] == [1]


def test_an_envelope_over_the_limit_fails_only_its_own_id(
    make_app: MakeApp, store_url: str
) -> None:
    # Each state fits, but changes whose listeners have not run yet are kept in
    # the envelope (with their prev and state): the store refuses that document.
    gate = threading.Event()

    def fill(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"v": data["c"] * 20_000}

    app = make_app(
        {"put": put, "fill": fill},
        {"slow": lambda change: gate.wait(30)},
        store=limited(store_url, 50_000),
    )
    try:
        committed = [app.send("fill", "m", {"c": "a"})]
        with pytest.raises(casern.InvalidState, match="envelope of 'm' is about"):
            for c in "bcde":
                committed.append(app.send("fill", "m", {"c": c}))
        assert app.send("put", "other", "fine") == {"v": "fine"}
    finally:
        gate.set()
    assert app.drain(timeout=60)
    assert app.get("m") == committed[-1]
    assert [h["seq"] for h in app.history("m")] == list(range(1, len(committed) + 1))


def test_many_sends_with_big_data_never_fill_the_envelope(
    make_app: MakeApp, store_url: str
) -> None:
    # Each send fits. A store without atomic history (CouchDB) keeps the newest
    # history records in the envelope until they move out: by size too, else
    # the 9th send here was refused, and every later one with it.
    def count(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1}

    app = make_app({"count": count}, store=limited(store_url, 200_000))
    blob = "x" * 20_000
    for i in range(30):
        assert app.send("count", "m", {"i": i, "blob": blob}) == {"n": i + 1}
    history = app.history("m")
    assert [(h["seq"], h["data"]) for h in history] == [
        (i + 1, {"i": i, "blob": blob}) for i in range(30)
    ]
    rec = app.store.get("m")
    assert rec is not None and len(json.dumps(rec.doc)) < 100_000


def test_pending_changes_keep_each_state_once_and_listeners_still_get_prev_and_state(
    make_app: MakeApp,
) -> None:
    release = threading.Event()
    first: list[tuple[int, Any, Any]] = []
    second: list[tuple[int, Any, Any]] = []

    def stuck(change: casern.Change) -> None:
        first.append((change.seq, change.prev, change.state))
        release.wait(10)
        raise RuntimeError("interrupted")

    def fill(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"v": data * 1_000}

    reducers = {"fill": fill}
    app1 = make_app(reducers, {"l": stuck}, backoff=casern.Backoff(initial=5, timeout=30))
    big = {c: c * 1_000 for c in "abcd"}
    for c in "abc":
        app1.send("fill", "m", c)
    envelope = app1.store.get("m")
    assert envelope is not None
    stored = dumps(envelope.doc)
    # Three changes pending: the envelope holds states a, b, c once each (was twice).
    assert [stored.count(big[c]) for c in "abc"] == [1, 1, 1]
    time.sleep(0.2)
    app1.close(timeout=0.1)  # the deliveries stay in the outbox
    release.set()
    app2 = make_app(
        reducers, {"l": lambda c: second.append((c.seq, c.prev, c.state))}, redeliver_after=0.0
    )
    app2.run_once()
    assert app2.drain(10)
    expected = [
        (1, {}, {"v": big["a"]}),
        (2, {"v": big["a"]}, {"v": big["b"]}),
        (3, {"v": big["b"]}, {"v": big["c"]}),
    ]
    assert first[:1] == expected[:1]
    assert second == expected
    app2.send("fill", "m", "d")  # acknowledged and new entries pack again
    assert app2.drain(10)
    assert second[-1] == (4, {"v": big["c"]}, {"v": big["d"]})


def test_failed_deliveries_keep_each_state_once_and_retry_still_gets_prev_and_state(
    make_app: MakeApp, store_url: str
) -> None:
    # Two listeners that fail on every change of a machine with 20 KB states.
    # Each failure record held the change's data, prev and state, per listener:
    # 80 KB a change, so the 5th change's failures no longer fit this 400 KB
    # envelope, its acknowledgement was refused and the machine was stuck.
    down = {"on": True}
    seen: list[tuple[str, int, Any, Any, Any]] = []

    def listener(name: str) -> Callable[[casern.Change], None]:
        def call(change: casern.Change) -> None:
            if down["on"]:
                raise ConnectionError("the mail server is down")
            seen.append((name, change.seq, change.data, change.prev, change.state))

        return call

    def fill(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"v": str(data) * 20_000}

    app = make_app(
        {"fill": fill},
        {"a": listener("a"), "b": listener("b")},
        store=limited(store_url, 400_000),
        backoff=casern.Backoff(attempts=1, initial=0.01, timeout=5),
    )
    for i in range(8):
        app.send("fill", "m", i)
        assert app.drain(10)
    assert sorted((f["seq"], f["listener"]) for f in app.failed()) == [
        (seq, name) for seq in range(1, 9) for name in "ab"
    ]
    rec = app.store.get("m")
    assert rec is not None and len(dumps(rec.doc)) < 9 * 20_000 + 10_000  # each state once
    down["on"] = False
    assert app.retry("m") == 16
    assert app.drain(10)
    state = [{}] + [{"v": str(i) * 20_000} for i in range(8)]
    expected = [(seq, seq - 1, state[seq - 1], state[seq]) for seq in range(1, 9)]
    for name in "ab":
        assert [(s, d, p, st) for n, s, d, p, st in seen if n == name] == expected
    assert app.failed() == []


@pytest.mark.couchdb
def test_couchdb_reads_its_document_limit_from_the_server(couchdb_base_url: str) -> None:
    store = CouchDBStore(fresh_couch_db(couchdb_base_url))
    try:
        pouch = store._high == "\uffff"
        assert store.max_document_size == (None if pouch else DEFAULT_MAX_DOCUMENT_SIZE)
    finally:
        store.close()


@pytest.mark.couchdb
def test_a_ten_megabyte_state_is_refused_up_front_by_apache_couchdb(couchdb_base_url: str) -> None:
    """Apache CouchDB refuses documents over 8 MB; pouchdb-server has no limit."""
    app = casern.Casern(fresh_couch_db(couchdb_base_url), {}, {}, {"put": put}, {})
    with app:
        if app.store.max_document_size is None:
            assert app.send("put", "m", "x" * 10_000_000)["v"] == "x" * 10_000_000
        else:
            with pytest.raises(casern.InvalidState, match="document limit of 8,000,000 bytes"):
                app.send("put", "m", "x" * 10_000_000)
            assert app.get("m") is None


# -- isolation in group commit ------------------------------------------------------------


class OneBatch:
    """Sends from many threads at once, all queued behind one held send: one group commit."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def hold(self, preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        self.gate.wait(10)  # everybody else queues meanwhile
        return {"held": True}

    def send(self, app: casern.Casern, sends: list[tuple[str, str, Any]]) -> dict[str, Any]:
        """{id: the committed state, or the CasernError}; the app needs reducer "hold"."""
        outcomes: dict[str, Any] = {}

        def sender(reducer: str, id: str, data: Any) -> None:
            try:
                outcomes[id] = app.send(reducer, id, data)
            except casern.CasernError as e:
                outcomes[id] = e

        holder = threading.Thread(target=app.send, args=("hold", "holder"))
        holder.start()
        threads = [threading.Thread(target=sender, args=s) for s in sends]
        for t in threads:
            t.start()
        time.sleep(0.2)  # not a threshold: a late sender only lands in a later batch
        self.gate.set()
        for t in (holder, *threads):
            t.join(30)
        return outcomes


def test_one_bad_send_among_41_threads_fails_alone(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """The blast radius of one hostile message is that message (and no traceback in the log)."""
    batch = OneBatch()
    app = make_app({"put": put, "hold": batch.hold, "surrogate": lambda p, s, d: {"v": "\ud800"}})
    good = [("put", f"good-{i}", i) for i in range(39)]
    outcomes = batch.send(app, [("put", "bad", "\ud800"), ("surrogate", "bad-state", None), *good])
    assert isinstance(outcomes["bad"], casern.InvalidData)
    assert isinstance(outcomes["bad-state"], casern.InvalidState)
    assert [outcomes[id] for _, id, _ in good] == [{"v": i} for i in range(39)]
    assert app.get("bad") is None and app.get("bad-state") is None
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert [app.get(id) for _, id, _ in good] == [{"v": i} for i in range(39)]


def test_misbehaving_reducers_and_timers_fail_only_their_own_ids(make_app: MakeApp) -> None:
    def boom(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    def bad_timer(preferences: Any, state: dict[str, Any]) -> float | None:
        if state.get("v") == "cursed":
            raise ValueError("cursed")
        return None

    batch = OneBatch()
    reducers = {
        "put": put,
        "hold": batch.hold,
        "boom": boom,
        "deep": lambda p, s, d: {"d": nested(10**5)},
    }
    app = make_app(reducers, timers={"put": bad_timer})
    bad = {"a": casern.ReducerError, "b": casern.InvalidState, "c": casern.ReducerError}
    good = [("put", f"ok-{i}", i) for i in range(20)]
    outcomes = batch.send(
        app, [("boom", "a", None), ("deep", "b", None), ("put", "c", "cursed"), *good]
    )
    assert {id: type(outcomes[id]) for id in bad} == bad
    assert all(app.get(id) is None for id in bad)
    assert [outcomes[id] for _, id, _ in good] == [{"v": i} for i in range(20)]


def test_a_store_refusing_one_document_lands_the_others(store_url: str) -> None:
    """`put_many` answers per write: the refused one is an error, the others landed."""
    store = limited(store_url, 10_000)
    try:
        writes = [
            Write("a", None, {"state": {"n": 1}, "seq": 1}),
            Write("b", None, {"state": {"bad": "\ud800"}, "seq": 1}),
            Write("c", None, {"state": {"big": "x" * 20_000}, "seq": 1}),
            Write("d", None, {"state": {"n": 4}, "seq": 1}),
        ]
        revs = store.put_many(writes)
        assert isinstance(revs[0], str) and isinstance(revs[3], str)
        assert isinstance(revs[1], casern.InvalidState) and "cannot be stored" in str(revs[1])
        assert isinstance(revs[2], casern.InvalidState) and "(10,000)" in str(revs[2])
        assert sorted(store.get_many(["a", "b", "c", "d"])) == ["a", "d"]
    finally:
        store.close()


@pytest.mark.couchdb
def test_a_couchdb_validation_refusing_one_document_lands_the_others(
    couchdb_base_url: str,
) -> None:
    store = CouchDBStore(fresh_couch_db(couchdb_base_url))
    ddoc = {
        "_id": "_design/no-forbidden",
        "validate_doc_update": (
            "function (doc) { if (doc.state && doc.state.v === 'forbidden')"
            " { throw({forbidden: 'forbidden states are refused'}); } }"
        ),
    }
    # Written to every replica (w=n): on a cluster a write may land on a replica the
    # design document had not reached yet, which then lets the forbidden state in.
    store._client.post(store._db, params={"w": str(store.n)}, json=ddoc).raise_for_status()
    app = casern.Casern(store, {}, {}, {"put": put}, {})

    async def together() -> list[Any]:
        sends = [app.asend("put", id, v) for id, v in [("a", 1), ("b", "forbidden"), ("c", 3)]]
        return await asyncio.gather(*sends, return_exceptions=True)

    with app:
        a, b, c = asyncio.run(together())
        assert isinstance(b, casern.InvalidState) and "forbidden states are refused" in str(b)
        assert (a, c) == ({"v": 1}, {"v": 3})
        assert app.get("a") == {"v": 1} and app.get("c") == {"v": 3} and app.get("b") is None


@pytest.mark.couchdb
@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "bad_request"), (500, "doc_validation"), (413, "document_too_large")],
)
def test_couchdb_refusing_one_documents_content_is_never_an_outage(
    couchdb_base_url: str, status: int, error: str
) -> None:
    """A whole `_bulk_docs` refused for one document: that one fails, the others land."""

    def fault(request: httpx.Request, forward: Callable[[], httpx.Response]) -> httpx.Response:
        if request.url.path.endswith("/_bulk_docs") and b"poison" in request.content:
            reason = "p" if status == 413 else "refused for its content"
            return httpx.Response(status, json={"error": error, "reason": reason})
        return forward()

    store = CouchDBStore(fresh_couch_db(couchdb_base_url), transport=Flaky(fault), retries=1)
    try:
        revs = store.put_many(
            [
                Write("a", None, {"state": {"v": 1}, "seq": 1}),
                Write("p", None, {"state": {"v": "poison"}, "seq": 1}),
                Write("c", None, {"state": {"v": 3}, "seq": 1}),
            ]
        )
        assert isinstance(revs[0], str) and isinstance(revs[2], str)
        assert isinstance(revs[1], casern.InvalidState)
        assert sorted(store.get_many(["a", "p", "c"])) == ["a", "c"]
    finally:
        store.close()
