"""Fork merge: sibling revisions of one envelope folded back into one, losing nothing.

A replicated store (a CouchDB cluster) can fork an envelope: two writers on
one revision each win on some replica, and both branches carry changes. On a
store that may fork, every applied action leaves an entry with a unique id
`u` in the envelope's journal (`ops`: the newest ones, bounded; past a size
of data only their ids, see `Fold._journal`), and the committer skips an
action whose `u` is already there, so a send retried after a conflict is
never applied twice.

A merge keeps one leaf as the base and replays, through the reducers (they
are pure, so replaying is safe), every journaled action of the other leaves
that the base does not hold; the other leaves are deleted in the same
request. The base is the leaf that needs the fewest replays: usually the
branch every writer moved on with, so changes that listeners may already
have seen keep their `seq`; replayed ones get fresh seqs and are delivered
as new changes.
"""

from __future__ import annotations

import logging
from typing import Any

from .stores.base import Doc, Record

log = logging.getLogger("casern")

__all__ = ["choose_base", "replay"]


def _uids(doc: Doc) -> set[str]:
    return {op["u"] for op in doc.get("ops", ())}


def _missing(base: Record, others: list[Record], *, report: bool = False) -> list[Doc]:
    """Journal entries of `others` that `base` has not applied, oldest first, once each.

    The journal is bounded: an entry older than the base's oldest one is shared
    history both branches had before they forked (its seq is the same on both),
    not a missing change. A fork older than the whole journal cannot be merged
    safely: `report` logs it.
    """
    journal = base.doc.get("ops", ())
    have = _uids(base.doc)
    oldest = min((int(op["seq"]) for op in journal), default=0)
    out: list[Doc] = []
    for leaf in others:
        ops = sorted(leaf.doc.get("ops", ()), key=lambda op: int(op["seq"]))
        truncated = oldest > 1 and ops and int(ops[0]["seq"]) > 1  # both journals cut
        if report and truncated and not any(op["u"] in have for op in ops):
            log.error(
                "a fork of %r is older than its journal of %d actions; the sibling's"
                " changes after seq %d are replayed, older ones may be lost",
                base.id,
                len(journal),
                oldest,
            )
        for op in ops:
            if int(op["seq"]) >= oldest and op["u"] not in have:
                have.add(op["u"])
                out.append(op)
    return out


def choose_base(leaves: list[Record]) -> Record:
    """The leaf to keep: fewest actions to replay onto it, then the highest seq, then
    the store's winner (listed first)."""

    def cost(i: int) -> tuple[int, int, int]:
        base = leaves[i]
        others = [leaf for leaf in leaves if leaf is not base]
        return (len(_missing(base, others)), -int(base.doc.get("seq", 0)), i)

    return leaves[min(range(len(leaves)), key=cost)]


def replay(base: Record, others: list[Record]) -> tuple[Record, list[Doc]]:
    """The base (with timer consumption merged in) and the journal entries to replay.

    A due time consumed on another branch stays consumed (a timer fires once),
    and a timer firing the base already holds is not replayed.
    """
    doc: dict[str, Any] = dict(base.doc)
    fired = dict(doc.get("fired", {}))
    due = dict(doc.get("due", {}))
    for leaf in others:
        for name, at in leaf.doc.get("fired", {}).items():
            if due.get(name) == at:
                del due[name]
            fired.setdefault(name, at)
    doc["fired"], doc["due"] = fired, due
    if due:
        doc["next_due"] = min(due.values())
    else:
        doc.pop("next_due", None)
        doc.pop("due", None)
    ops: list[Doc] = []
    for op in _missing(base, others, report=True):
        if "reducer" not in op:  # kept without its data (see `Fold._journal`)
            log.error(
                "a fork of %r: the sibling's change seq %d cannot be replayed, its data is"
                " no longer in the journal (which keeps the newest actions' data up to a"
                " size); it is lost in the merge",
                base.id,
                int(op["seq"]),
            )
        elif not ("fire" in op and base.doc.get("fired", {}).get(op["reducer"]) == op["fire"]):
            ops.append(op)
    if ops:
        log.warning(
            "merged a fork of %r: %d action(s) of %d sibling revision(s) replayed",
            base.id,
            len(ops),
            len(others),
        )
    return Record(base.id, base.rev, doc), ops
