"""The JSON casern accepts: one rule for every store, checked before anything is written.

SQLite, Apache CouchDB and pouchdb-server disagree at the edges of JSON, so
casern holds data and states to what all of them keep exactly:

- text is valid Unicode: no lone surrogates (`"\\ud800"`), in values or keys;
- at most `MAX_DEPTH` containers nest in one another (`[[1]]` is 2 levels;
  pouchdb-server overflows its stack near 5,000, Python's `json` near 1,000);
- integers within ±`MAX_SAFE_INTEGER` (2**53 - 1: JavaScript peers round
  beyond it, CouchDB answers 500 to 10**400);
- floats finite and not subnormal (CouchDB turns 5e-324 into 0.0); -0.0 is
  stored as 0.0 everywhere (CouchDB and pouchdb-server drop the sign).

The checks run on the encoded text first (C-speed scans); only a text that
looks suspicious is walked in Python to name the offending path.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_SAFE_INTEGER", "Refusal", "dumps", "encodable", "to_json"]

MAX_DEPTH = 100
MAX_SAFE_INTEGER = 2**53 - 1
_MIN_NORMAL = sys.float_info.min

# One encoder, built once: json.dumps with options builds a new one per call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

# Every digit becomes "0", every byte that can precede an integer token becomes
# ":": an integer of 16 digits or more (beyond 2**53 - 1, or close) shows as
# ":" and 16 zeros. Fractions follow ".", so floats never match.
_INTEGERS = bytes.maketrans(b"0123456789[,:-", b"0000000000::::")
_LONG_INTEGER = b":" + b"0" * 16
_CONTAINERS = (dict, list, tuple)


def dumps(value: Any) -> str:
    """Canonical JSON text: compact, unicode kept, NaN refused (no rule checks)."""
    return _ENCODE(value)


class Refusal(ValueError):
    """A value casern will not store; the message names the JSON path and says why."""


def to_json(value: Any) -> tuple[str, Any]:
    """Return (canonical JSON text, a parsed copy) of `value`, or raise `Refusal`."""
    try:
        text = _ENCODE(value)
    except (TypeError, ValueError, RecursionError) as e:
        raise _refusal(value) or Refusal(f"is not JSON: {e}") from None
    if _suspicious(value, text):
        refusal = _refusal(value)
        if refusal is not None:
            raise refusal
    if "-0.0" in text:  # cheap: JSON writes -0.0 as exactly this
        parsed = json.loads(text, parse_float=_unsigned_zero)
        text = _ENCODE(parsed)
    else:
        parsed = json.loads(text)
    if parsed != value:  # json turns non-str keys into strings and tuples into lists
        refusal = _refusal(value)
        if refusal is not None:
            raise refusal
    return text, parsed


def _unsigned_zero(text: str) -> float:
    return float(text) + 0.0  # -0.0 + 0.0 == +0.0 in IEEE 754


def _suspicious(value: Any, text: str) -> bool:
    """True if `value` (encoded as `text`) may break a rule; false positives only cost a walk."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return True
    if b"e-3" in raw or _LONG_INTEGER in raw.translate(_INTEGERS):  # subnormal? 2**53?
        return True
    containers = raw.count(b"[") + raw.count(b"{")  # at most: strings may hold some
    return containers > MAX_DEPTH and _too_deep(value, containers)


def _too_deep(value: Any, containers: int) -> bool:
    """True if more than `MAX_DEPTH` containers nest (breadth first: no recursion).

    Stops as soon as the containers not yet seen are too few to go deeper:
    a long list of small objects costs one level, not a walk.
    """
    level, seen = [value], 1
    for depth in range(1, MAX_DEPTH + 1):
        if depth + containers - seen <= MAX_DEPTH:
            return False
        below: list[Any] = []
        for node in level:
            items = node.values() if type(node) is dict else node
            below += [v for v in items if type(v) in _CONTAINERS]
        if not below:
            return False
        seen += len(below)
        level = below
    return True


def _path(parts: list[str | int]) -> str:
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.isidentifier():
            out += f".{p}"
        else:
            out += f"[{json.dumps(p)}]"
    return out


def _refusal(value: Any) -> Refusal | None:
    """Walk `value` (iteratively: it may be deeper than Python's stack) for the first problem."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH and isinstance(node, dict | list | tuple):
            return Refusal(
                f"nests deeper than {MAX_DEPTH} levels (at {_path(path[:5])}...); flatten it"
            )
        problem = _scalar_problem(node)
        if problem is not None:
            return Refusal(f"at {_path(path)}: {problem}")
        if isinstance(node, dict):
            items = list(node.items())
            for k, v in reversed(items):
                if not isinstance(k, str):
                    return Refusal(
                        f"at {_path(path)}: has a non-str key {k!r:.60}; JSON keys are strings"
                    )
                if not encodable(k):
                    return Refusal(
                        f"at {_path(path)}: the key {k!r:.60} holds a lone surrogate, which is"
                        " not Unicode text (broken UTF-16?); decode it properly or drop it"
                    )
                stack.append((v, [*path, k]))
        elif isinstance(node, list | tuple):
            for i in range(len(node) - 1, -1, -1):
                stack.append((node[i], [*path, i]))
    return None


def _scalar_problem(node: Any) -> str | None:
    if isinstance(node, str):
        if not encodable(node):
            return (
                f"the string {node!r:.60} holds a lone surrogate, which is not Unicode text"
                " (broken UTF-16?); decode it properly or drop it"
            )
        return None
    if node is None or isinstance(node, bool | dict | list | tuple):
        return None
    if isinstance(node, int):
        if -MAX_SAFE_INTEGER <= node <= MAX_SAFE_INTEGER:
            return None
        shown = repr(node) if node.bit_length() < 128 else f"of {node.bit_length()} bits"
        return (
            f"the integer {shown} is beyond ±(2**53 - 1), which JSON peers and CouchDB do"
            " not all keep exactly; store it as a string"
        )
    if isinstance(node, float):
        if not math.isfinite(node):
            return f"{node} is not JSON-serialisable (JSON has no NaN, no Infinity); use null"
        if node != 0.0 and abs(node) < _MIN_NORMAL:
            return (
                f"the float {node!r} is subnormal (below 2.2e-308), which CouchDB rounds to 0;"
                " store 0 or a string"
            )
        return None
    return (
        f"a {type(node).__name__} is not JSON-serialisable"
        " (use dict, list, str, int, float, bool, None)"
    )


def encodable(text: str) -> bool:
    """True if `text` is valid Unicode (no lone surrogates): it can be written as UTF-8."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
