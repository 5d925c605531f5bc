"""CONTRACT.md, "Errors": on every error nothing is written and no listener runs."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest

import casern
from conftest import inc

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "meta": {"type": "object", "properties": {"n": {"type": "integer"}}},
    },
    "required": ["text"],
}


@pytest.fixture
def app(make_app: Any) -> Any:
    calls: list[Any] = []

    def bad(preferences: Any, state: dict[str, Any], data: Any) -> Any:
        return BAD_STATES[data]

    def boom(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        raise LookupError("no such thing")

    app = make_app(
        {"inc": inc, "bad": bad, "boom": boom, "say": inc},
        {"spy": lambda change: calls.append(change.seq)},
        schemas={"say": SCHEMA},
    )
    app.send("inc", "a", {"start": True})
    app.drain(10)
    app.calls = calls
    return app


def assert_untouched(app: Any) -> None:
    app.drain(10)
    assert app.get("a") == {"n": 1, "last": {"start": True}}
    assert [h["seq"] for h in app.history("a")] == [1]
    assert app.calls == [1]


def test_every_error_is_a_casern_error() -> None:
    for name in casern.__all__:
        obj = getattr(casern, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, casern.CasernError)


def test_unknown_reducer_names_the_known_ones(app: Any) -> None:
    with pytest.raises(casern.UnknownReducer, match=r"'nope'.*known: bad, boom, inc, say"):
        app.send("nope", "a")
    assert_untouched(app)


def test_unknown_reducer_suggests_the_closest_name(app: Any) -> None:
    with pytest.raises(casern.UnknownReducer, match=r"did you mean 'inc'\?"):
        app.send("incr", "a")
    assert_untouched(app)


def test_reducers_in_the_preferences_slot_get_a_hint_on_the_positional_order() -> None:
    app = casern.Casern("sqlite://", {"inc": inc})
    with app, pytest.raises(casern.UnknownReducer, match=r"'inc' is in preferences.*reducers="):
        app.send("inc", "a")


def test_invalid_data_names_the_failing_path(app: Any) -> None:
    with pytest.raises(casern.InvalidData, match=r"\$\.meta\.n"):
        app.send("say", "a", {"text": "hi", "meta": {"n": "x"}})
    with pytest.raises(casern.InvalidData, match="'text' is a required property"):
        app.send("say", "a", {})
    assert_untouched(app)
    assert app.send("say", "a", {"text": "ok"})["n"] == 2


def test_data_that_is_not_json_is_invalid_data(app: Any) -> None:
    for data in ({1, 2}, object(), {"x": math.nan}, {1: "int key"}):
        with pytest.raises(casern.InvalidData):
            app.send("inc", "a", data)
    assert_untouched(app)


BAD_STATES: dict[str, Any] = {
    "None": None,
    "list": [],
    "str": "state",
    "int": 42,
    "int-key": {1: "int key"},
    "nested-int-key": {"nested": [{2: "x"}]},
    "inf": {"nan": math.inf},
    "set": {"s": {1, 2}},
    "object": {"o": object()},
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_reducer_returning_no_json_object_raises_invalid_state(app: Any, case: str) -> None:
    with pytest.raises(casern.InvalidState, match="'bad'"):
        app.send("bad", "a", case)
    assert_untouched(app)


def test_a_reducer_that_raises_gives_reducer_error_with_the_cause(app: Any) -> None:
    with pytest.raises(casern.ReducerError, match="'boom' raised LookupError") as info:
        app.send("boom", "a")
    assert isinstance(info.value.__cause__, LookupError)
    assert_untouched(app)


def test_a_failing_send_does_not_hold_back_the_sends_folded_with_it(make_app: Any) -> None:
    import threading

    app = make_app({"inc": inc, "boom": lambda p, s, d: 1 / 0})
    errors: list[BaseException] = []

    def boom() -> None:
        try:
            app.send("boom", "a")
        except casern.ReducerError as e:
            errors.append(e)

    threads = [threading.Thread(target=app.send, args=("inc", "a")) for _ in range(10)]
    threads += [threading.Thread(target=boom) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 5 and app.get("a") == {"n": 10}


HOSTILE_IDS = [
    "_design/x",
    "_local/x",
    "_all_docs",
    "../x",
    "..",
    "a/b",
    "a?b",
    "a#b",
    "a b",
    "%2F",
    "日本語-🙂",
    "line\nbreak",
    "tab\there",
    "x" * 1024,
    "x" * 5000,
    "",
    " ",
]


@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=lambda s: repr(s[:20]))
def test_hostile_ids_round_trip_exactly_or_raise_invalid_id(make_app: Any, hostile: str) -> None:
    app = make_app()
    try:
        state = app.send("inc", hostile, {"id": hostile})
    except casern.InvalidId as e:
        assert str(e)
        assert app.ids() == []
        with pytest.raises(casern.InvalidId):
            app.get(hostile)
        return
    assert state == {"n": 1, "last": {"id": hostile}}
    assert app.get(hostile) == state
    assert app.ids() == [hostile]
    assert app.history(hostile)[0]["data"] == {"id": hostile}
    # it reached no other document
    for other in ("x", "a", "b", "design", "_design", "..", "/"):
        if other != hostile:
            with contextlib.suppress(casern.InvalidId):
                assert app.get(other) is None


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ("t",), ""], ids=repr)
def test_non_str_and_empty_ids_raise_invalid_id(make_app: Any, bad: Any) -> None:
    app = make_app()
    with pytest.raises(casern.InvalidId):
        app.send("inc", bad)
    assert app.ids() == []


def test_ids_that_must_be_refused_are(make_app: Any) -> None:
    app = make_app()
    for refused in ("", "x" * 1025, "_design/x", "a\nb", "\x00"):
        with pytest.raises(casern.InvalidId):
            app.send("inc", refused)


@pytest.mark.parametrize("char", ["é", "🙂"])
def test_the_longest_unicode_ids_work_in_history_and_listings(make_app: Any, char: str) -> None:
    # 1,024 characters is allowed whatever they are. On CouchDB, history and
    # ids(prefix=, after=) put the id into the URL, JSON-escaped and then
    # percent-encoded (up to 32 KB): Apache CouchDB answered 400 and
    # pouchdb-server 431, raised as StoreUnavailable.
    app = make_app()
    long = char * 1024
    ids = [long, char * 1023 + "z", "a"]
    for id in ids:
        app.send("inc", id, {"i": 1})
        app.send("inc", id, {"i": 2})
    assert [h["data"] for h in app.history(long)] == [{"i": 1}, {"i": 2}]
    assert [h["seq"] for h in app.history(long, after=1)] == [2]
    assert app.ids(prefix=long) == [long]
    assert app.ids(prefix=char * 1023) == sorted(ids[:2])
    assert app.ids(after=long) == [i for i in sorted(ids) if i > long]


def test_a_state_written_by_newer_code_raises_upgrade_error(make_app: Any) -> None:
    new = make_app(state_version=3)
    new.send("inc", "a")
    old = make_app(state_version=2)
    with pytest.raises(casern.UpgradeError, match="state_version=3"):
        old.get("a")
    with pytest.raises(casern.UpgradeError):
        old.send("inc", "a")
    assert new.get("a") == {"n": 1}


def test_sqlite_store_in_a_missing_folder_is_store_unavailable(tmp_path: Any) -> None:
    with pytest.raises(casern.StoreUnavailable, match="does not exist"):
        casern.Casern(f"sqlite:///{tmp_path}/missing/state.db", {}, {}, {"inc": inc}, {})


def test_pathological_contention_is_conflict_error_and_writes_nothing(make_app: Any) -> None:
    from casern._engine import Engine

    app = make_app()
    app.send("inc", "a")
    engine: Engine = app._engine
    store = engine.store
    real_put = store.put_many
    store.put_many = lambda writes: [None for _ in writes]  # type: ignore[method-assign]
    engine.max_conflicts = 3
    try:
        with pytest.raises(casern.ConflictError, match="'a'"):
            app.send("inc", "a")
    finally:
        store.put_many = real_put  # type: ignore[method-assign]
    assert app.get("a") == {"n": 1}


def test_bad_construction_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="no reducer 'tick'"):
        casern.Casern("sqlite://", {}, {}, {"inc": inc}, {}, timers={"tick": lambda p, s: None})
    with pytest.raises(TypeError, match="reducer 'x' must be callable"):
        casern.Casern("sqlite://", {}, {}, {"x": 3}, {})
    with pytest.raises(ValueError, match="unknown store URL"):
        casern.Casern("ftp://user:secret@host/db", {}, {}, {}, {})
    try:
        casern.Casern("ftp://user:secret@host/db", {}, {}, {}, {})
    except ValueError as e:
        assert "secret" not in str(e)


def test_a_reducer_that_sends_gets_a_clear_error_not_a_deadlock(make_app: Any) -> None:
    apps: list[Any] = []

    def impure(p: Any, s: dict[str, Any], d: Any) -> dict[str, Any]:
        apps[0].send("inc", "other")
        return s

    app = make_app({"inc": inc, "impure": impure})
    apps.append(app)
    with pytest.raises(casern.ReducerError, match=r"must be\s+pure") as info:
        app.send("impure", "a")
    assert isinstance(info.value.__cause__, casern.CasernError)
    assert app.get("a") is None and app.get("other") is None


def test_idempotency_keys_longer_than_1024_characters_are_invalid_data(make_app: Any) -> None:
    app = make_app()
    with pytest.raises(casern.InvalidData, match="at most 1024 characters"):
        app.send("inc", "a", key="k" * 1025)
    with pytest.raises(casern.InvalidData, match="key must be a str"):
        app.send("inc", "a", key=42)
    assert app.get("a") is None
    assert app.send("inc", "a", key="k" * 1024) == {"n": 1}


def test_an_upgrade_that_returns_no_dict_is_named_in_the_error(make_app: Any) -> None:
    make_app().send("inc", "a")
    v2 = make_app(state_version=2, upgrade=lambda p, v, s: None)
    with pytest.raises(casern.UpgradeError, match=r"upgrade\(preferences, 1, state\) must return"):
        v2.get("a")


def test_a_closed_app_says_it_is_closed(make_app: Any) -> None:
    app = make_app()
    app.send("inc", "a")
    app.close()
    app.close()  # twice is fine
    for call in (
        lambda: app.send("inc", "a"),
        lambda: app.get("a"),
        lambda: app.history("a"),
        lambda: app.ids(),
        lambda: app.failed(),
        lambda: app.retry(),
        lambda: app.migrate(),
        lambda: app.run_once(),
        app.start,
    ):
        with pytest.raises(casern.CasernError, match="app is closed"):
            call()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_keys": -1}, "keep_keys must be an int >= 0"),
        ({"cache_size": 1.5}, "cache_size must be an int >= 0"),
        ({"backoff": {"attempts": 3}}, "backoff must be a casern.Backoff"),
        ({"upgrade": 5}, "upgrade must be fn"),
        ({"redeliver_after": -1}, "redeliver_after must be >= 0"),
        ({"tick": 0}, "tick must be > 0"),
        ({"state_version": 0}, "state_version must be an int >= 1"),
    ],
)
def test_bad_options_are_refused_with_what_to_write(options: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        casern.Casern("sqlite://", {}, {}, {"inc": inc}, {}, **options)


def test_bad_backoffs_and_tables_are_refused() -> None:
    for bad in ({"attempts": 2.5}, {"attempts": 0}, {"initial": 10, "maximum": 1}, {"timeout": 0}):
        with pytest.raises(ValueError, match="Backoff"):
            casern.Backoff(**bad)
    with pytest.raises(TypeError, match="reducers must be a mapping"):
        casern.Casern("sqlite://", {}, {}, [inc], {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["sqlite:orders.db", "sqlite:/x.db", "sqlite://host/x.db", "sqlite:///x.db?mode=ro"]
)
def test_sqlite_url_typos_are_refused_not_guessed(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///"):
        casern.Casern(url, {}, {}, {"inc": inc}, {})


def test_an_sqlite_file_from_a_newer_casern_is_refused_not_misread(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "newer.db"
    casern.Casern(f"sqlite:///{path}", {}, {}, {"inc": inc}, {}).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(casern.StoreUnavailable, match="written by a newer casern"):
        casern.Casern(f"sqlite:///{path}", {}, {}, {"inc": inc}, {})


def test_an_sqlite_file_in_a_folder_that_is_not_writable_says_so() -> None:
    # /sys refuses new files even to root (for whom permission bits do not count).
    with pytest.raises(casern.StoreUnavailable, match="the folder /sys is not writable"):
        casern.Casern("sqlite:////sys/state.db", {}, {}, {"inc": inc}, {})
