"""CONTRACT.md, "History and versions": history, replay, upgrades and migrate."""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

import pytest

import casern
from conftest import inc


def test_history_lists_every_committed_change_oldest_first(make_app: Any) -> None:
    app = make_app({"inc": inc, "same": lambda p, s, d: s})
    app.send("inc", "a", {"text": "one"}, key="k1")
    app.send("same", "a")
    app.send("inc", "a", {"text": "two"})
    history = app.history("a")
    assert [(h["seq"], h["reducer"], h["data"], h["key"]) for h in history] == [
        (1, "inc", {"text": "one"}, "k1"),
        (2, "inc", {"text": "two"}, None),
    ]
    for h in history:
        assert datetime.fromisoformat(h["applied_at"]).tzinfo is not None
        assert h["version"] == 1
    assert app.history("unknown") == []


def test_history_is_complete_under_concurrent_writers(make_app: Any) -> None:
    app = make_app(listeners={"spy": lambda c: None})
    threads = [
        threading.Thread(target=lambda: [app.send("inc", "a") for _ in range(20)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [h["seq"] for h in app.history("a")] == list(range(1, 81))
    assert app.drain(10)
    assert [h["seq"] for h in app.history("a")] == list(range(1, 81))


def test_replay_folds_history_through_the_current_reducers(make_app: Any) -> None:
    app = make_app()
    for i in range(5):
        app.send("inc", "a", {"i": i})
    assert app.replay("a") == app.get("a") == {"n": 5, "last": {"i": 4}}
    assert app.replay("nobody") == {}


def test_replay_reports_an_impure_reducer(make_app: Any, caplog: Any) -> None:
    counter = {"calls": 0}

    def impure(p: Any, s: dict[str, Any], d: Any) -> dict[str, Any]:
        counter["calls"] += 1
        return {"calls": counter["calls"]}

    app = make_app({"impure": impure})
    app.send("impure", "a")
    with caplog.at_level(logging.WARNING, logger="casern"):
        assert app.replay("a") == {"calls": 2}
    assert "differs from its stored state" in caplog.text


def test_history_can_be_turned_off(make_app: Any) -> None:
    app = make_app(history=False)
    app.send("inc", "a")
    with pytest.raises(casern.CasernError, match="history is off"):
        app.history("a")


def rename_n_to_count(preferences: Any, old_version: int, state: dict[str, Any]) -> dict[str, Any]:
    if old_version == 1:
        state["count"] = state.pop("n", 0)
    return state


def inc_count(p: Any, s: dict[str, Any], d: Any) -> dict[str, Any]:
    return {**s, "count": s.get("count", 0) + 1}


def test_older_states_are_upgraded_lazily_on_load(make_app: Any) -> None:
    v1 = make_app()
    v1.send("inc", "a")
    v1.send("inc", "a")
    v2 = make_app({"inc": inc_count}, state_version=2, upgrade=rename_n_to_count)
    assert v2.get("a") == {"count": 2}
    assert v2.store.get("a").doc["version"] == 1  # a read writes nothing
    assert v2.send("inc", "a") == {"count": 3}
    assert v2.store.get("a").doc["version"] == 2
    assert [h["version"] for h in v2.history("a")] == [1, 1, 2]


def test_listeners_only_ever_see_upgraded_states(make_app: Any) -> None:
    v1 = make_app()
    v1.send("inc", "a")
    seen: list[tuple[Any, Any]] = []
    v2 = make_app(
        {"inc": inc_count},
        {"spy": lambda c: seen.append((c.prev, c.state))},
        state_version=2,
        upgrade=rename_n_to_count,
    )
    v2.send("inc", "a")
    assert v2.drain(10)
    assert seen == [({"count": 1}, {"count": 2})]


def test_migrate_upgrades_every_stored_state_and_can_run_again(make_app: Any) -> None:
    v1 = make_app()
    for i in range(25):
        v1.send("inc", f"m{i:02}")
    v2 = make_app({"inc": inc_count}, state_version=2, upgrade=rename_n_to_count)
    done: list[int] = []
    assert v2.migrate(progress=done.append, batch=10) == 25
    assert sum(done) == 25
    assert all(v2.store.get(f"m{i:02}").doc["version"] == 2 for i in range(25))
    assert v2.get("m00") == {"count": 1}
    assert v2.migrate() == 0  # resumable: what is done is skipped


def test_migrate_interrupted_and_rerun_finishes_the_job(make_app: Any) -> None:
    v1 = make_app()
    for i in range(30):
        v1.send("inc", f"m{i:02}")
    v2 = make_app({"inc": inc_count}, state_version=2, upgrade=rename_n_to_count)

    class Interrupt(Exception):
        pass

    def stop_after_first_page(n: int) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        v2.migrate(progress=stop_after_first_page, batch=10)
    versions = [v2.store.get(f"m{i:02}").doc["version"] for i in range(30)]
    assert versions.count(2) == 10
    assert v2.migrate(batch=10) == 20
    assert all(v2.get(f"m{i:02}") == {"count": 1} for i in range(30))


def test_migrate_racing_live_sends_loses_no_update(make_app: Any) -> None:
    v1 = make_app()
    for i in range(20):
        v1.send("inc", f"m{i:02}")
    live = make_app({"inc": inc_count}, state_version=2, upgrade=rename_n_to_count)
    migrator = make_app({"inc": inc_count}, state_version=2, upgrade=rename_n_to_count)

    def traffic() -> None:
        for _ in range(5):
            for i in range(20):
                live.send("inc", f"m{i:02}")

    t = threading.Thread(target=traffic)
    t.start()
    migrator.migrate(batch=5)
    t.join()
    assert all(migrator.get(f"m{i:02}") == {"count": 6} for i in range(20))


def test_a_failing_upgrade_raises_upgrade_error_never_a_silent_reset(make_app: Any) -> None:
    v1 = make_app()
    v1.send("inc", "a")

    def broken(p: Any, v: int, s: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("shape")

    v2 = make_app({"inc": inc_count}, state_version=2, upgrade=broken)
    with pytest.raises(casern.UpgradeError, match="from state_version=1 to 2"):
        v2.get("a")
    with pytest.raises(casern.UpgradeError):
        v2.send("inc", "a")
    with pytest.raises(casern.UpgradeError):
        v2.migrate()
    v3 = make_app({"inc": inc_count}, state_version=2)
    with pytest.raises(casern.UpgradeError, match="pass upgrade="):
        v3.get("a")
    assert v1.get("a") == {"n": 1}
    assert v1.store.get("a").doc["version"] == 1


def test_long_histories_can_be_read_in_pages(make_app: Any) -> None:
    app = make_app()
    for i in range(130):
        app.send("inc", "a", i)
    pages: list[list[int]] = []
    after = 0
    while page := app.history("a", after=after, limit=40):
        pages.append([h["seq"] for h in page])
        after = page[-1]["seq"]
    assert [len(p) for p in pages] == [40, 40, 40, 10]
    assert [seq for p in pages for seq in p] == list(range(1, 131))
    assert [h["data"] for h in app.history("a", after=125)] == [125, 126, 127, 128, 129]
