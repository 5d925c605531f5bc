"""The fold's own helpers, beside what the contract tests check through the public API."""

from __future__ import annotations

import logging
import random
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

from casern._actions import SEND, Action
from casern._fold import Fold, Plan, Rules, now_iso
from casern._json import dumps
from casern._merge import replay
from casern.stores.base import Record


def test_applied_at_is_what_isoformat_writes_within_a_microsecond() -> None:
    """`now_iso` formats the date part once a second; the text must not drift from datetime's."""
    rng = random.Random(11)
    times = [rng.uniform(0, 4e9) for _ in range(20_000)] + [0.0, 1.5, 1.9999999, 59.0]
    for at in times:
        ours = datetime.fromisoformat(now_iso(at))
        theirs = datetime.fromtimestamp(at, UTC)
        assert abs((ours - theirs).total_seconds()) <= 1e-6, (at, now_iso(at), theirs)
        assert ours.tzinfo is not None and ours.utcoffset() == theirs.utcoffset()


# -- what an envelope carries of big data -----------------------------------------------


def _rules(**overrides: Any) -> Rules:
    def count(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1}

    settings: dict[str, Any] = {
        "preferences": {},
        "reducers": {"count": count},
        "timers": {},
        "state_version": 1,
        "upgrade": None,
        "history": True,
        "outbox": False,
        "journal": True,
        "log_chunk": 50,
        "keep_keys": 100,
        "redeliver_after": None,
        "token": "t",
        "limit": 8_000_000,
    }
    return Rules(**{**settings, **overrides})


def _send(data: Any, uid: str) -> Action:
    return Action(SEND, "m", Future(), "count", dumps(data), uid=uid)


def _fold(rules: Rules, rec: Record | None, *actions: Action) -> tuple[Record, Plan]:
    plan = Fold(rules, "m", rec).run(list(actions))
    assert plan.doc is not None
    return Record("m", str(int(rec.rev) + 1 if rec else 1), plan.doc), plan


def test_the_journal_keeps_every_id_but_only_the_newest_data_up_to_its_budget() -> None:
    rules = _rules()
    blob = "x" * 20_000
    rec, _ = _fold(rules, None, *(_send({"i": i, "blob": blob}, f"u{i}") for i in range(4)))
    assert all("reducer" in op for op in rec.doc["ops"])  # one fold's own: all whole
    for i in range(4, 10):
        rec, _ = _fold(rules, rec, _send({"i": i, "blob": blob}, f"u{i}"))
    ops = rec.doc["ops"]
    assert [op["u"] for op in ops] == [f"u{i}" for i in range(10)]  # every id: dedupe
    assert [op["seq"] for op in ops if "reducer" in op] == [8, 9, 10]  # 64 KiB of data
    assert ops[-1]["data"] == {"i": 9, "blob": blob}
    # A send retried after its data left the journal is still applied once.
    plan = Fold(rules, "m", rec).run([_send({"i": 0, "blob": blob}, "u0")])
    assert plan.results[0][1] == '{"n":10}' and plan.doc is None


def test_history_waiting_in_the_envelope_moves_out_by_size_too() -> None:
    rules = _rules(journal=False)
    blob = "x" * 40_000
    rec, plan = _fold(rules, None, _send({"blob": blob}, ""), _send({"blob": blob}, ""))
    assert len(rec.doc["log"]) == 2 and not plan.flush_log  # one fold: both wait
    rec, plan = _fold(rules, rec, _send({"blob": blob}, ""))
    assert [e["seq"] for e in plan.flush_log] == [1, 2]  # over 64 KiB: moved out first
    assert [e["seq"] for e in rec.doc["log"]] == [3]
    rec, plan = _fold(_rules(journal=False, limit=100_000), rec, _send({"blob": "y"}, ""))
    assert [e["seq"] for e in plan.flush_log] == [3]  # a small document limit: sooner
    assert [e["seq"] for e in rec.doc["log"]] == [4]


def test_a_merge_names_a_sibling_change_whose_data_left_the_journal(caplog: Any) -> None:
    base = Record("m", "2-a", {"state": {"n": 1}, "seq": 1, "ops": [{"u": "a", "seq": 1}]})
    other = Record(
        "m",
        "2-b",
        {"state": {"n": 2}, "seq": 2, "ops": [{"u": "b", "seq": 1}, _op("c", 2, {"i": 1})]},
    )
    with caplog.at_level(logging.ERROR, logger="casern"):
        _, ops = replay(base, [other])
    assert [op["u"] for op in ops] == ["c"]
    assert "change seq 1 cannot be replayed" in caplog.text


def _op(u: str, seq: int, data: Any) -> dict[str, Any]:
    return {"u": u, "seq": seq, "reducer": "count", "data": data, "key": None}
