"""The fold's own helpers, beside what the contract tests check through the public API."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from casern._fold import now_iso


def test_applied_at_is_what_isoformat_writes_within_a_microsecond() -> None:
    """`now_iso` formats the date part once a second; the text must not drift from datetime's."""
    rng = random.Random(11)
    times = [rng.uniform(0, 4e9) for _ in range(20_000)] + [0.0, 1.5, 1.9999999, 59.0]
    for at in times:
        ours = datetime.fromisoformat(now_iso(at))
        theirs = datetime.fromtimestamp(at, UTC)
        assert abs((ours - theirs).total_seconds()) <= 1e-6, (at, now_iso(at), theirs)
        assert ours.tzinfo is not None and ours.utcoffset() == theirs.utcoffset()
