"""SQLiteStore's indexed columns: due, pending and failed always follow the envelope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from casern.stores.base import Write
from casern.stores.sqlite import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(f"sqlite:///{tmp_path}/s.db")
    yield s
    s.close()


def env(**fields: Any) -> dict[str, Any]:
    return {"state": {}, "seq": 1, "version": 1, **fields}


def indexed(store: SQLiteStore, id: str) -> tuple[Any, ...]:
    row = store._db.execute(
        "SELECT next_due, pending_since, nfailed FROM machines WHERE id = ?", (id,)
    ).fetchone()
    return tuple(row)


@pytest.mark.parametrize("with_base", [True, False], ids=["base given", "no base"])
def test_indexed_columns_follow_every_write(store: SQLiteStore, with_base: bool) -> None:
    """A write that names its base document sets only the indexed columns that change."""
    steps = [
        env(next_due=50.0, pending_since=10.0),
        env(next_due=50.0, pending_since=10.0, state={"n": 1}),  # unchanged: left alone
        env(pending_since=10.0, failed=[{"seq": 1}], nfailed=1),  # due gone, a failure
        env(next_due=70.0),  # pending and failed gone
    ]
    rev = store.put_many([Write("m", None, steps[0])])[0]
    assert isinstance(rev, str)
    base = steps[0]
    for doc in steps[1:]:
        rev = store.put_many([Write("m", rev, doc, base=base if with_base else None)])[0]
        assert isinstance(rev, str)
        base = doc
        due = doc.get("next_due")
        assert indexed(store, "m") == (due, doc.get("pending_since"), doc.get("nfailed", 0))
        assert store.due(100.0, 10) == (["m"] if due is not None else [])
        assert store.pending(100.0, 10) == (["m"] if "pending_since" in doc else [])
        assert store.failed(10) == (["m"] if doc.get("nfailed") else [])
    assert store.get("m") is not None and store.get("m").doc == steps[-1]  # type: ignore[union-attr]


def test_state_json_is_written_as_given(store: SQLiteStore) -> None:
    """The engine's JSON of the state goes into the envelope as is; the rest is encoded."""
    doc = env(state={"b": 1, "a": [1, 2]}, keys=["k"])
    rev = store.put_many([Write("m", None, doc, state_json='{"b":1,"a":[1,2]}')])[0]
    assert rev == "1"
    (text,) = store._db.execute("SELECT doc FROM machines WHERE id = 'm'").fetchone()
    assert text == '{"state":{"b":1,"a":[1,2]},"seq":1,"version":1,"keys":["k"]}'
    rec = store.get("m")
    assert rec is not None and rec.doc == doc
