"""CONTRACT.md, "Sending": every sentence, on every store."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from typing import Any

import pytest

import casern
from conftest import inc


def test_unknown_machine_starts_from_empty_state(make_app: Any) -> None:
    seen: list[dict[str, Any]] = []

    def record(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        seen.append(dict(state))
        return {"hello": data}

    app = make_app({"record": record})
    assert app.get("new") is None
    assert app.send("record", "new", "world") == {"hello": "world"}
    assert seen == [{}]
    assert app.get("new") == {"hello": "world"}


def test_send_returns_a_copy_of_the_committed_state(make_app: Any) -> None:
    app = make_app()
    state = app.send("inc", "a")
    state["n"] = 999
    got = app.get("a")
    assert got == {"n": 1}
    got["n"] = 1000
    assert app.get("a") == {"n": 1}


def test_reducers_get_deep_copies_and_cannot_corrupt_anything(make_app: Any) -> None:
    kept: list[Any] = []

    def vandal(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        kept.append((state, data))
        state.setdefault("items", []).append(len(state.get("items", [])))
        data["mutated"] = True
        return state

    app = make_app({"vandal": vandal})
    payload = {"x": [1, 2]}
    app.send("vandal", "a", payload)
    assert payload == {"x": [1, 2]}
    kept[0][0]["items"].append("evil")  # mutate what the reducer saw, after the fact
    assert app.get("a") == {"items": [0]}
    assert app.send("vandal", "a", payload) == {"items": [0, 1]}


def test_equal_state_commits_nothing_and_triggers_no_listener(make_app: Any) -> None:
    calls: list[int] = []
    app = make_app(
        {"inc": inc, "same": lambda p, s, d: s, "copy": lambda p, s, d: dict(s)},
        {"count": lambda change: calls.append(change.seq)},
    )
    app.send("inc", "a")
    app.drain(10)
    assert app.send("same", "a") == {"n": 1}
    assert app.send("copy", "a") == {"n": 1}
    app.drain(10)
    assert calls == [1]
    assert [h["seq"] for h in app.history("a")] == [1]
    assert app.send("same", "never-seen") == {}
    assert app.get("never-seen") is None


def test_idempotency_key_applies_once_and_returns_current_state(make_app: Any) -> None:
    app = make_app()
    assert app.send("inc", "a", key="order-1") == {"n": 1}
    assert app.send("inc", "a", key="order-1") == {"n": 1}
    assert app.send("inc", "a") == {"n": 2}
    assert app.send("inc", "a", key="order-1") == {"n": 2}
    assert app.send("inc", "b", key="order-1") == {"n": 1}  # keys are per id
    assert [h["key"] for h in app.history("a")] == ["order-1", None]


def test_key_is_recorded_only_by_a_send_that_commits(make_app: Any) -> None:
    app = make_app({"inc": inc, "same": lambda p, s, d: s, "boom": _boom})
    app.send("same", "a", key="k")
    with pytest.raises(casern.ReducerError):
        app.send("boom", "a", key="k2")
    assert app.send("inc", "a", key="k") == {"n": 1}
    assert app.send("inc", "a", key="k2") == {"n": 2}


def test_every_committed_change_gets_seq_without_gaps(make_app: Any) -> None:
    app = make_app({"inc": inc, "same": lambda p, s, d: s})
    for _ in range(5):
        app.send("inc", "a")
        app.send("same", "a")
    assert [h["seq"] for h in app.history("a")] == [1, 2, 3, 4, 5]


def test_eight_threads_on_one_id_lose_no_update(make_app: Any) -> None:
    app = make_app()
    per_thread = 25

    def work(t: int) -> None:
        for i in range(per_thread):
            app.send("inc", "shared", {"t": t, "i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert app.get("shared")["n"] == 8 * per_thread
    assert [h["seq"] for h in app.history("shared")] == list(range(1, 8 * per_thread + 1))


def _process_sender(url: str, sends: int, threads: int) -> None:
    app = casern.Casern(url, {}, {}, {"inc": inc}, {})
    try:
        workers = [
            threading.Thread(target=lambda: [app.send("inc", "shared") for _ in range(sends)])
            for _ in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        app.close()


def test_two_processes_with_eight_threads_each_lose_no_update(
    make_app: Any, store_url: str
) -> None:
    sends, threads = 15, 8
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_process_sender, args=(store_url, sends, threads)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, "a sender process failed (ConflictError under ordinary contention?)"
    app = make_app()
    assert app.get("shared") == {"n": 2 * threads * sends}
    assert [h["seq"] for h in app.history("shared")][-1] == 2 * threads * sends


def test_150_concurrent_asends_lose_no_update(make_app: Any) -> None:
    app = make_app()

    async def main() -> list[dict[str, Any]]:
        one = [app.asend("inc", "hot", i) for i in range(75)]
        many = [app.asend("inc", f"id-{i}", i) for i in range(75)]
        return await asyncio.gather(*one, *many)

    results = asyncio.run(main())
    assert sorted(r["n"] for r in results[:75]) == list(range(1, 76))
    assert all(r == {"n": 1, "last": i} for i, r in enumerate(results[75:]))
    assert app.get("hot")["n"] == 75

    async def read() -> Any:
        return await app.aget("hot"), await app.aget("nobody")

    hot, nobody = asyncio.run(read())
    assert hot["n"] == 75 and nobody is None


def test_concurrent_sends_to_different_ids_all_commit(make_app: Any) -> None:
    app = make_app()
    ids = [f"m{i}" for i in range(200)]
    threads = [threading.Thread(target=app.send, args=("inc", id)) for id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(app.get(id) == {"n": 1} for id in ids)
    assert sorted(app.ids(limit=1000)) == sorted(ids)


def test_preferences_are_handed_read_only_to_reducers(make_app: Any) -> None:
    def greet(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        with pytest.raises(TypeError):
            preferences["greeting"] = "changed"
        return {"said": preferences["greeting"]}

    app = make_app({"greet": greet}, preferences={"greeting": "hi"})
    assert app.send("greet", "a") == {"said": "hi"}


def _boom(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    raise RuntimeError("kaboom")


def test_values_equal_in_python_but_different_in_json_are_a_change(make_app: Any) -> None:
    app = make_app({"set": lambda p, s, d: {"v": d}})
    assert app.send("set", "a", 1) == {"v": 1}
    assert app.send("set", "a", True)["v"] is True  # True == 1 in Python, not in JSON
    assert app.send("set", "a", 0)["v"] == 0
    assert app.send("set", "a", False)["v"] is False
    assert app.send("set", "a", 0.0)["v"] == 0  # 0 and 0.0 are one JSON number
    assert app.send("set", "a", 0)["v"] == 0
    assert [h["data"] for h in app.history("a")] == [1, True, 0, False, 0]
    assert app.get("a")["v"] == 0 and app.get("a")["v"] is not False


def test_preferences_are_deep_read_only(make_app: Any) -> None:
    def remember(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        preferences["limits"]["max"] = 999
        return state

    def count(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"max": preferences["limits"]["max"], "tags": list(preferences["tags"])}

    prefs = {"limits": {"max": 1}, "tags": ["a", "b"]}
    app = make_app({"remember": remember, "count": count}, preferences=prefs)
    with pytest.raises(casern.ReducerError, match="does not support item assignment"):
        app.send("remember", "x")
    assert app.send("count", "x") == {"max": 1, "tags": ["a", "b"]}
    prefs["limits"]["max"] = 2  # the app took its own copy
    assert app.send("count", "y") == {"max": 1, "tags": ["a", "b"]}


def test_casern_with_no_store_uses_casern_db_in_the_current_folder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with casern.Casern(reducers={"inc": inc}) as app:
        assert app.send("inc", "a") == {"n": 1}
    assert (tmp_path / "casern.db").exists()
    with casern.Casern("sqlite:///casern.db", reducers={"inc": inc}) as again:
        assert again.get("a") == {"n": 1}
