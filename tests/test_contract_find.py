"""CONTRACT.md, "Finding machines by their state": find, afind, indexes, InvalidQuery.

Every test runs on every store. The operator table is also checked against
`casern._query.matches`, the reference meaning each store's translation must
agree with.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import casern
from casern._query import matches, parse
from casern.stores.couchdb import _mango
from casern.stores.sqlite import find_sql
from conftest import STORES, fresh_couch_db


def put(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    """Replace the state with `data`."""
    return dict(data)


INDEXES = ("status", "owner.team", "n")

# States chosen so that each operator meets every JSON type, a missing field,
# a nested object and an array.
STATES: dict[str, dict[str, Any]] = {
    "a": {"status": "open", "n": 1, "owner": {"team": "a"}, "tags": ["x", "y"], "flag": True},
    "b": {"status": "closed", "n": 2.5, "owner": {"team": "b"}, "flag": False},
    "c": {"status": "open", "n": 10, "owner": {"team": "b"}, "tags": ["z"]},
    "d": {"status": None, "n": "10", "owner": "nobody"},
    "e": {"status": "escalated", "n": True},
    "f": {"other": 1},
    "g": {"status": ["open"], "n": [1], "tags": "x"},
    "h": {"status": {"open": 1}, "n": 0, "owner": {"team": None}, "flag": [True]},
    "i": {"status": "Open", "n": -3, "owner": {"team": "a", "lead": "ann"}},
}

CASES: list[tuple[Any, list[str]]] = [
    # equality: within the JSON type (true is not 1, "10" is not 10, 1 is 1.0)
    ({"status": "open"}, ["a", "c"]),
    ({"status": {"$eq": "open"}}, ["a", "c"]),
    ({"status": None}, ["d"]),
    ({"n": 1}, ["a"]),
    ({"n": 1.0}, ["a"]),
    ({"n": 10}, ["c"]),
    ({"n": "10"}, ["d"]),
    ({"n": True}, ["e"]),
    ({"flag": False}, ["b"]),
    ({"owner.team": "b"}, ["b", "c"]),
    ({"owner": {"team": "a"}}, ["a", "i"]),
    ({"owner.team": None}, ["h"]),
    # $ne and $nin need the field to exist, as in CouchDB
    ({"status": {"$ne": "open"}}, ["b", "d", "e", "g", "h", "i"]),
    ({"owner.team": {"$ne": "a"}}, ["b", "c", "h"]),
    ({"n": {"$ne": 1}}, ["b", "c", "d", "e", "g", "h", "i"]),
    # ranges stay within a type: numbers by value, booleans false < true
    ({"n": {"$gt": 1}}, ["b", "c"]),
    ({"n": {"$gte": 1}}, ["a", "b", "c"]),
    ({"n": {"$lt": 1}}, ["h", "i"]),
    ({"n": {"$lte": 2.5}}, ["a", "b", "h", "i"]),
    ({"n": {"$gt": 0, "$lt": 10}}, ["a", "b"]),
    ({"n": {"$gt": "1"}}, ["d"]),
    ({"n": {"$lt": "2"}}, ["d"]),
    ({"status": {"$gte": "closed", "$lt": "open"}}, ["b", "e"]),
    ({"flag": {"$gt": False}}, ["a"]),
    ({"flag": {"$lte": True}}, ["a", "b"]),
    ({"flag": {"$gt": True}}, []),
    # $in and $nin: one of the values, or an array holding one of them
    ({"status": {"$in": ["open", "closed"]}}, ["a", "b", "c", "g"]),
    ({"n": {"$in": [1, "10", None]}}, ["a", "d", "g"]),
    ({"tags": {"$in": ["x"]}}, ["a", "g"]),
    ({"flag": {"$in": [True]}}, ["a", "h"]),
    ({"status": {"$in": []}}, []),
    ({"status": {"$nin": ["open", "closed"]}}, ["d", "e", "h", "i"]),
    ({"tags": {"$nin": ["x"]}}, ["c"]),
    # $exists
    ({"tags": {"$exists": True}}, ["a", "c", "g"]),
    ({"owner.team": {"$exists": False}}, ["d", "e", "f", "g"]),
    ({"status": {"$exists": True}, "flag": {"$exists": False}}, ["c", "d", "e", "g", "i"]),
    # combinators
    ({"$and": [{"status": "open"}, {"owner.team": "b"}]}, ["c"]),
    ({"$or": [{"status": "escalated"}, {"owner.team": "a"}]}, ["a", "e", "i"]),
    ({"$or": [{"n": {"$lt": 0}}, {"$and": [{"status": "open"}, {"n": {"$gt": 5}}]}]}, ["c", "i"]),
    ({"status": "open", "owner.team": "a"}, ["a"]),
    ({}, sorted(STATES)),
]


@pytest.fixture(scope="module", params=STORES)
def table(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[casern.Casern]:
    """One app per store holding STATES, shared by the read-only operator tests."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('find')}/state.db"
    else:
        url = fresh_couch_db(request.getfixturevalue("couchdb_base_url"))
    app = casern.Casern(url, {}, {}, {"put": put}, {}, indexes=INDEXES)
    for id, state in STATES.items():
        app.send("put", id, state)
    yield app
    app.close()


@pytest.mark.parametrize(("selector", "expected"), CASES, ids=[str(s) for s, _ in CASES])
def test_every_operator_matches_as_couchdb_does(
    table: casern.Casern, selector: Any, expected: list[str]
) -> None:
    reference = [id for id, state in sorted(STATES.items()) if matches(parse(selector), state)]
    assert reference == expected
    assert table.find(selector) == expected


def random_selector(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A selector over STATES' fields: any operator, any JSON scalar (string ranges aside:
    their order is the store's own, see test_string_ranges_follow_the_stores_string_order)."""
    if depth < 2 and rng.random() < 0.3:
        parts = [random_selector(rng, depth + 1) for _ in range(rng.randint(1, 3))]
        return {rng.choice(["$and", "$or"]): parts}
    field = rng.choice(["status", "n", "owner.team", "tags", "flag", "other", "missing"])
    values: list[Any] = [None, True, False, 0, 1, 2.5, 10, -3, "open", "10", "x", "a", "b"]
    op = rng.choice(["=", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"])
    if op == "=":
        return {field: rng.choice(values)}
    if op in ("$in", "$nin"):
        return {field: {op: rng.sample(values, rng.randint(0, 3))}}
    if op == "$exists":
        return {field: {op: rng.random() < 0.5}}
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return {field: {op: rng.choice([v for v in values if not isinstance(v, str | None)])}}
    return {field: {op: rng.choice(values)}}


def test_random_selectors_agree_with_the_reference(table: casern.Casern) -> None:
    rng = random.Random(13)
    for _ in range(150):
        selector = random_selector(rng)
        expected = [id for id, state in sorted(STATES.items()) if matches(parse(selector), state)]
        assert table.find(selector) == expected, selector


def test_afind_is_find_for_asyncio(table: casern.Casern) -> None:
    assert asyncio.run(table.afind({"status": "open"}, limit=1, after="a")) == ["c"]


def test_find_sees_the_current_state(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app({"put": put}, indexes=("status",))
    app.send("put", "x", {"status": "open"})
    assert app.find({"status": "open"}) == ["x"]
    app.send("put", "x", {"status": "closed"})
    assert app.find({"status": "open"}) == []
    assert app.find({"status": "closed"}) == ["x"]


def test_pages_with_after_in_ascending_id_order(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app({"put": put}, indexes=("status",))
    ids = [f"m-{i:03d}" for i in range(60)]
    for id in ids:
        app.send("put", id, {"status": "open" if int(id[2:]) % 3 else "closed", "i": int(id[2:])})
    wanted = [id for id in ids if int(id[2:]) % 3]
    for selector, expected in [
        ({"status": "open"}, wanted),
        ({"i": {"$gte": 0}, "status": {"$ne": "closed"}}, wanted),
        ({"status": "open", "i": {"$nin": [1, 2, 4, 5, 7]}}, wanted[5:]),  # rechecked answers
    ]:
        pages, after = [], None
        while page := app.find(selector, limit=7, after=after):
            assert len(page) <= 7
            pages.extend(page)
            after = page[-1]
        assert pages == expected, selector
    assert app.find({"status": "open"}, after="m-0305", limit=2) == ["m-031", "m-032"]
    assert app.find({"status": "open"}, after="m-999") == []
    assert app.find({"status": "open"}, limit=0) == []
    assert app.find({"status": "open"}) == wanted[:100]


HOSTILE_IDS = [
    "a/b",
    "a?b=c",
    "a#b",
    "../etc",
    "with space",
    "ünïcødé",
    "emoji-\U0001f600",
    "quote'd",
    'double"quote',
    "'; DROP TABLE machines; --",
    "%2F",
]


def test_hostile_ids_come_back_exactly(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app({"put": put}, indexes=("status",))
    for id in HOSTILE_IDS:
        app.send("put", id, {"status": "odd"})
    app.send("put", "plain", {"status": "even"})
    assert app.find({"status": "odd"}) == sorted(HOSTILE_IDS)  # code point order
    assert app.find({"status": {"$ne": "even"}}, limit=1000) == sorted(HOSTILE_IDS)
    first = app.find({"status": "odd"}, limit=4)
    assert app.find({"status": "odd"}, after=first[-1]) == sorted(HOSTILE_IDS)[4:]


def test_field_names_and_values_are_data_not_sql(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app({"put": put}, indexes=("it's",))
    app.send("put", "a", {"it's": "x' OR '1'='1", "x') OR 1=1 --": 1, "ключ": {"é t": 2}})
    app.send("put", "b", {"it's": "y"})
    assert app.find({"it's": "x' OR '1'='1"}) == ["a"]
    assert app.find({"it's": "' OR 1=1 --"}) == []
    assert app.find({"x') OR 1=1 --": 1}) == ["a"]
    assert app.find({"x') OR 1=1 --": {"$exists": False}}) == ["b"]
    assert app.find({"ключ.é t": 2}) == ["a"]


def test_unindexed_fields_are_found_too(make_app: Callable[..., casern.Casern]) -> None:
    app = make_app({"put": put})
    for i in range(20):
        app.send("put", f"m{i:02d}", {"kind": "even" if i % 2 == 0 else "odd", "i": i})
    assert app.find({"kind": "odd", "i": {"$gt": 14}}) == ["m15", "m17", "m19"]


def test_indexes_survive_reopening(make_app: Callable[..., casern.Casern], store_url: str) -> None:
    first = make_app({"put": put}, indexes=("status", "owner.team"))
    first.send("put", "a", {"status": "open", "owner": {"team": "t"}})
    first.close()
    again = make_app({"put": put}, indexes=("owner.team", "status", "status"))
    assert again.find({"owner.team": "t", "status": "open"}) == ["a"]
    other = again.with_store(store_url)
    try:
        assert other.indexes == ("owner.team", "status")
    finally:
        other.close()


def test_find_sees_states_as_stored_until_migrate(
    make_app: Callable[..., casern.Casern],
) -> None:
    old = make_app({"put": put})
    old.send("put", "a", {"n": 3})
    old.close()

    def upgrade(preferences: Any, version: int, state: dict[str, Any]) -> dict[str, Any]:
        return {"count": state.pop("n", 0), **state}

    new = make_app({"put": put}, state_version=2, upgrade=upgrade, indexes=("count",))
    assert new.get("a") == {"count": 3}  # get upgrades on load ...
    assert new.find({"count": 3}) == []  # ... find matches the stored (old) shape
    assert new.find({"n": 3}) == ["a"]
    assert new.migrate() == 1
    assert new.find({"count": 3}) == ["a"]
    assert new.find({"n": 3}) == []


BAD_SELECTORS: list[tuple[Any, str]] = [
    ("status", "a selector is a JSON object"),
    (["status"], "a selector is a JSON object"),
    (None, "a selector is a JSON object"),
    ({"status": {"$regex": "o.*"}}, "unknown operator '$regex'"),
    ({"$nor": [{"a": 1}]}, "unknown operator '$nor'"),
    ({"status": {"$in": "open"}}, "$in on field 'status' takes a list"),
    ({"status": {"$nin": 3}}, "$nin on field 'status' takes a list"),
    ({"status": {"$exists": 1}}, "$exists on field 'status' takes true or false"),
    ({"$and": []}, "$and takes a non-empty list"),
    ({"$or": {"a": 1}}, "$or takes a non-empty list"),
    ({"$or": ["a"]}, "$or[0] must be a selector object"),
    ({"tags": ["x"]}, "field 'tags': compares with JSON scalars"),
    ({"tags": {"$eq": {"a": 1}}}, "$eq on field 'tags': compares with JSON scalars"),
    ({"n": {"$gt": None}}, "$gt on field 'n' compares numbers, strings or booleans"),
    ({"n": {"$lt": float("nan")}}, "is not a JSON number"),
    ({"n": 2**70}, "beyond the 64-bit integers"),
    ({"status": {}}, "an empty object is no condition"),
    ({"owner": {"team": 1, "$eq": 2}}, "mixes operators and field names"),
    ({"a..b": 1}, "has an empty part"),
    ({"a.$b": 1}, "would read as an operator"),
    ({'say "hi"': 1}, "quotes, backslashes and control characters"),
    ({"n": {"$in": list(range(1001))}}, "more than 1000 values"),
    ({"x": b"bytes"}, "bytes b'bytes' is not a JSON value"),
    ({"owner": {"$or": [{"team": 1}]}}, "unknown operator '$or' on field 'owner'"),
    ({1: "a"}, "selector keys are strings"),
    (functools.reduce(lambda sel, _: {"$and": [sel]}, range(20), {"a": 1}), "nests deeper"),
]


@pytest.mark.parametrize(("selector", "message"), BAD_SELECTORS, ids=[m for _, m in BAD_SELECTORS])
def test_a_selector_it_cannot_run_raises_invalid_query_naming_the_part(
    make_app: Callable[..., casern.Casern], selector: Any, message: str
) -> None:
    app = make_app({"put": put})
    with pytest.raises(casern.InvalidQuery) as caught:
        app.find(selector)
    assert message in str(caught.value)
    assert isinstance(caught.value, casern.CasernError)


def test_bad_limits_after_and_indexes_are_refused(
    make_app: Callable[..., casern.Casern],
) -> None:
    app = make_app({"put": put})
    with pytest.raises(casern.InvalidQuery, match="limit must be an int >= 0"):
        app.find({}, limit=-1)
    with pytest.raises(casern.InvalidQuery, match="after is the last id"):
        app.find({}, after=3)  # type: ignore[arg-type]
    with pytest.raises(casern.InvalidQuery, match="has an empty part"):
        make_app({"put": put}, indexes=("owner.",))
    with pytest.raises(TypeError, match="indexes is a list of field names"):
        make_app({"put": put}, indexes="status")


INDEX_SERVED = [
    {"status": "open"},
    {"status": {"$in": ["open", "closed"]}},
    {"n": {"$gt": 5}},
    {"n": {"$lte": "5"}},
    {"status": "open", "tags": {"$exists": False}},
]


@pytest.mark.parametrize("selector", INDEX_SERVED, ids=[str(s) for s in INDEX_SERVED])
def test_a_selector_on_an_indexed_field_is_served_by_its_index(
    make_app: Callable[..., casern.Casern], store_url: str, selector: Any
) -> None:
    app = make_app({"put": put}, indexes=("status", "n"))
    app.send("put", "a", {"status": "open", "n": 7})
    query = parse(selector)
    if store_url.startswith("sqlite"):
        sql, args = find_sql(query, limit=10, after="0")
        plan = [row[3] for row in app.store._db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]  # type: ignore[attr-defined]
        assert any(step.startswith("SEARCH machines USING INDEX find_") for step in plan), plan
        # The only scan allowed is of the (partial) index of rows holding arrays.
        assert all("_arrays" in step for step in plan if step.startswith("SCAN machines")), plan
    else:
        body = {"selector": _mango(query), "fields": ["_id"]}
        answer = httpx.post(f"{store_url}/_explain", json=body, timeout=10).json()
        assert answer["index"]["ddoc"].startswith("_design/casern-find-"), answer["index"]


def stored_find_indexes(store_url: str) -> list[tuple[str, str]]:
    """The find indexes in the store: (name, definition) in SQLite, (ddoc, _rev) in CouchDB."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            rows = db.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'find_%'")
            return sorted(rows.fetchall())
    params = {"startkey": '"_design/casern-find-"', "endkey": '"_design/casern-find.."'}
    rows = httpx.get(f"{store_url}/_all_docs", params=params, timeout=10).json()["rows"]
    return sorted((row["id"], row["value"]["rev"]) for row in rows)


def test_indexes_are_created_only_when_missing(
    make_app: Callable[..., casern.Casern], store_url: str
) -> None:
    make_app({"put": put}, indexes=("status", "owner.team")).close()
    before = stored_find_indexes(store_url)
    assert len(before) == (4 if store_url.startswith("sqlite") else 2)
    # Opened again: nothing re-posted (pouchdb-server would rebuild an index posted twice).
    make_app({"put": put}, indexes=("owner.team", "status")).close()
    assert stored_find_indexes(store_url) == before


def test_string_ranges_follow_the_stores_string_order(
    make_app: Callable[..., casern.Casern],
) -> None:
    app = make_app({"put": put}, indexes=("s",))
    app.send("put", "lower", {"s": "a"})
    app.send("put", "upper", {"s": "B"})
    # README: code point order on SQLite and pouchdb-server, ICU collation on Apache CouchDB.
    icu = app.store.url.startswith("http") and app.store._high != "\uffff"  # type: ignore[attr-defined]
    assert app.find({"s": {"$gt": "B"}}) == ([] if icu else ["lower"])
    assert app.find({"s": {"$lt": "B"}}) == (["lower"] if icu else [])
    assert app.find({"s": {"$gte": "B", "$lte": "B"}}) == ["upper"]
