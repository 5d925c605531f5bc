"""Property: arbitrary JSON-ish data, sent among well-formed sends, fails alone or round-trips.

Hypothesis draws what a stranger could send (lone surrogates and NUL, deep and
wide nesting, big and special numbers, long strings). Each hostile send is
made together with well-formed ones, in one group commit: it either
round-trips exactly (as JSON: 1 and 1.0 are one number, -0.0 is 0) or fails
alone with a `CasernError` that says why; every well-formed send commits; the
store stays consistent (history folds to the state).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casern
from casern._fold import same

EXAMPLES = 25  # bounded: the suite runs it on every store

_ids = itertools.count()


def put(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**state, "v": data}


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


texts = st.text(st.characters(exclude_categories=[]), max_size=20) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\U0001f600", "\u2028", "x" * 100_000]
)
numbers = (
    st.integers()
    | st.sampled_from([2**53 - 1, 2**53, -(2**53), 10**400, -(10**20)])
    | st.floats()
    | st.sampled_from([-0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308])
)
scalars = st.none() | st.booleans() | numbers | texts
hostile = (
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
        max_leaves=30,
    )
    | st.integers(1, 400).map(nested)
    | st.lists(st.integers(0, 9), min_size=500, max_size=2_000)
)


@pytest.fixture
def app(make_app: Any) -> casern.Casern:
    return make_app({"put": put}, {"seen": lambda change: None})  # type: ignore[no-any-return]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=hostile)
def test_hostile_data_round_trips_or_fails_alone(app: casern.Casern, data: Any) -> None:
    n = next(_ids)
    bad, good = f"hostile-{n}", [f"good-{n}-{i}" for i in range(5)]

    async def together() -> list[Any]:
        sends = [
            app.asend("put", bad, data),
            *(app.asend("put", id, i) for i, id in enumerate(good)),
        ]
        return await asyncio.gather(*sends, return_exceptions=True)

    outcome, *rest = asyncio.run(together())
    assert rest == [{"v": i} for i in range(5)]
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, casern.InvalidData | casern.InvalidState), repr(outcome)
        assert str(outcome)
        assert app.get(bad) is None and app.history(bad) == []
    else:
        assert same(outcome["v"], data)
        stored = app.get(bad)
        assert stored is not None and same(stored, outcome)
        [entry] = app.history(bad)
        assert same(entry["data"], outcome["v"])
        assert same(app.replay(bad), stored)
