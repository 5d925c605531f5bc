"""The outbox as stored: each pending change's `prev` and `state` kept once.

Listeners get both states of a change, so a pending entry needs them; but
with several changes pending, the `state` of change n is the `prev` of change
n + 1, and the newest change's `state` is the envelope's own. Storing each
only once keeps an envelope with k pending changes at k + 1 states, not
2k + 1 (a 5 MB state with two pending changes: 15 MB instead of 25 MB).

Failed deliveries (`failed`, one record per change and listener) are kept
the same way, apart from the outbox: a change's data, prev and state once
whatever the number of listeners that gave up on it, each state once. Else a
listener failing for a while on a machine with big states filled its
envelope, and the acknowledgement that recorded the next failure was refused.

Whoever changes `pending` or `failed` unpacks it first and packs it on the way out.
"""

from __future__ import annotations

from typing import Any

from .stores.base import Doc

__all__ = ["pack", "pack_failed", "unpack", "unpack_failed"]


def pack(pending: list[Doc], seq: int) -> list[Doc]:
    """`pending` (full entries) as stored in an envelope whose newest change is `seq`."""
    seqs = {e["seq"] for e in pending}
    out = []
    for e in pending:
        drop = _shared(e, seq, seqs)
        out.append({k: v for k, v in e.items() if k not in drop} if drop else e)
    return out


def unpack(doc: Doc) -> list[Doc]:
    """The envelope's pending entries, each with its `prev` and `state` (see `pack`)."""
    pending: list[Doc] = list(doc.get("pending", ()))
    if all("prev" in e and "state" in e for e in pending):
        return pending
    return _with_states(sorted(pending, key=lambda e: e["seq"]), doc)


def _shared(e: Doc, seq: int, seqs: set[int]) -> tuple[str, ...]:
    """The states entry `e` need not store: the envelope's own, or the previous entry's."""
    drop: tuple[str, ...] = ("state",) if e["seq"] == seq else ()
    if e["seq"] - 1 in seqs:
        drop += ("prev",)
    return drop


def _with_states(entries: list[Doc], doc: Doc) -> list[Doc]:
    """Copies of `entries`, each given back the `state` and `prev` that `_shared` left out."""
    states: dict[int, Any] = {int(doc.get("seq", 0)): doc.get("state", {})}
    for e in entries:
        if "state" in e:
            states[e["seq"]] = e["state"]
    out = []
    for e in entries:
        full = dict(e)
        full.setdefault("state", states[e["seq"]])
        full.setdefault("prev", states.get(e["seq"] - 1, {}))
        out.append(full)
    return out


_CHANGE = ("data", "prev", "state")  # what the failure records of one change share


def pack_failed(failed: list[Doc], seq: int) -> list[Doc]:
    """`failed` (full records) as stored in an envelope whose newest change is `seq`.

    The first record of a change keeps its data, and its states as `pack` does;
    the change's other records (other listeners) keep neither.
    """
    seqs = {f["seq"] for f in failed}
    seen: set[int] = set()
    out = []
    for f in sorted(failed, key=lambda f: f["seq"]):
        drop = _CHANGE if f["seq"] in seen else _shared(f, seq, seqs)
        seen.add(f["seq"])
        out.append({k: v for k, v in f.items() if k not in drop} if drop else f)
    return out


def unpack_failed(doc: Doc) -> list[Doc]:
    """The envelope's failure records, each with its data, prev and state (see `pack_failed`)."""
    failed: list[Doc] = list(doc.get("failed", ()))
    if all(k in f for f in failed for k in _CHANGE):
        return failed
    data: dict[int, Any] = {}
    for f in failed:
        if "data" in f:
            data.setdefault(f["seq"], f["data"])
    out = _with_states(failed, doc)
    for f in out:
        if f["seq"] in data:
            f.setdefault("data", data[f["seq"]])
    return out
