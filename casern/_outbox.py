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
        drop: tuple[str, ...] = ("state",) if e["seq"] == seq else ()
        if e["seq"] - 1 in seqs:
            drop += ("prev",)
        out.append({k: v for k, v in e.items() if k not in drop} if drop else e)
    return out


def unpack(doc: Doc) -> list[Doc]:
    """The envelope's pending entries, each with its `prev` and `state` (see `pack`)."""
    pending: list[Doc] = list(doc.get("pending", ()))
    if all("prev" in e and "state" in e for e in pending):
        return pending
    states: dict[int, Any] = {int(doc.get("seq", 0)): doc.get("state", {})}
    for e in pending:
        if "state" in e:
            states[e["seq"]] = e["state"]
    out = []
    for e in sorted(pending, key=lambda e: e["seq"]):
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
        drop: tuple[str, ...] = _CHANGE if f["seq"] in seen else ()
        if not drop:
            seen.add(f["seq"])
            if f["seq"] == seq:
                drop += ("state",)
            if f["seq"] - 1 in seqs:
                drop += ("prev",)
        out.append({k: v for k, v in f.items() if k not in drop} if drop else f)
    return out


def unpack_failed(doc: Doc) -> list[Doc]:
    """The envelope's failure records, each with its data, prev and state (see `pack_failed`)."""
    failed: list[Doc] = list(doc.get("failed", ()))
    if all(k in f for f in failed for k in _CHANGE):
        return failed
    states: dict[int, Any] = {int(doc.get("seq", 0)): doc.get("state", {})}
    change: dict[int, Doc] = {}
    for f in failed:
        shared = change.setdefault(f["seq"], {})
        for k in ("data", "state"):
            if k in f:
                shared.setdefault(k, f[k])
        if "state" in f:
            states.setdefault(f["seq"], f["state"])
    out = []
    for f in failed:
        full = dict(f)
        shared = change[f["seq"]]
        if "data" in shared:
            full.setdefault("data", shared["data"])
        full.setdefault("state", states[f["seq"]])
        full.setdefault("prev", states.get(f["seq"] - 1, {}))
        out.append(full)
    return out
