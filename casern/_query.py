"""Selectors for `find`: a subset of CouchDB's Mango, checked once, in one place.

`parse(selector)` turns a user's selector into a small store-neutral tree that
every store translates (SQLite into SQL with bound values; CouchDB into a Mango
selector that may match more, whose answers `matches` checks again); no store
parses selectors itself. Anything the tree cannot express raises
`InvalidQuery`, naming the bad part.

The meaning is CouchDB's where the stores can agree on it:

- a field is a dotted path into the state (`"owner.team"`), each part an
  object key; `{"owner": {"team": "a"}}` means the same as `{"owner.team": "a"}`;
- a condition on a field that is missing is false, except `{"$exists": false}`
  (so `$ne` and `$nin` match only states that have the field);
- values compare within their JSON type: numbers by value (`1 == 1.0`,
  `true` is not `1`), strings in the store's string order, `false < true`;
  a range never matches a value of another type (CouchDB's collation would let
  `{"$gt": 5}` match every string: the stores add bounds so that it does not);
- `$in` and `$nin` also look inside an array (as CouchDB's do), equality does not;
- operands are JSON scalars (null, booleans, numbers, strings): equality with
  an array or an object is refused rather than given a store-dependent meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidQuery

__all__ = [
    "RANGES",
    "All",
    "AnyOf",
    "Cond",
    "Query",
    "Scalar",
    "check_path",
    "matches",
    "parse",
    "paths",
]

Scalar = None | bool | int | float | str

#: Operators on one field, and the combinators, as Mango spells them.
OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
COMBINATORS = ("$and", "$or")
RANGES = ("gt", "gte", "lt", "lte")

#: Bounds that keep a hostile selector from building a huge SQL statement.
MAX_VALUES = 1000
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Cond:
    """One condition on one state field.

    `op` is one of eq, ne, gt, gte, lt, lte (`value` a scalar; ranges take a
    number or a string), in, nin (`value` a tuple of scalars) or exists
    (`value` a bool).
    """

    path: tuple[str, ...]
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class All:
    """Every part matches (`$and`); no parts matches every machine (`{}`)."""

    parts: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one part matches (`$or`); never empty."""

    parts: tuple[Query, ...]


Query = Cond | All | AnyOf


def parse(selector: Any) -> Query:
    """Check a Mango-style selector and return its store-neutral form."""
    if not isinstance(selector, Mapping):
        raise InvalidQuery(
            f'a selector is a JSON object such as {{"status": "open"}}, not {_kind(selector)}'
        )
    counter = [0]
    return _object(selector, (), counter, 0)


def check_path(field: Any) -> tuple[str, ...]:
    """Split a dotted field name into its keys, refusing names no store can address."""
    if not isinstance(field, str) or not field:
        raise InvalidQuery(f"a field name is a non-empty str such as 'owner.team', not {field!r}")
    parts = tuple(field.split("."))
    for part in parts:
        if not part:
            raise InvalidQuery(f"field {field!r} has an empty part (two dots, or a dot at an end)")
        if part.startswith("$"):
            raise InvalidQuery(
                f"field {field!r}: a part starting with '$' would read as an operator"
            )
        if any(c in part for c in '"\\') or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise InvalidQuery(
                f"field {field!r}: quotes, backslashes and control characters"
                " cannot be queried on every store"
            )
        _check_text(part, f"field {field!r}")
    return parts


# -- the grammar ---------------------------------------------------------------------


def _object(
    sel: Mapping[Any, Any], prefix: tuple[str, ...], counter: list[int], depth: int
) -> Query:
    """A selector object: its members all hold (an implicit `$and`)."""
    if depth > MAX_DEPTH:
        raise InvalidQuery(f"the selector nests deeper than {MAX_DEPTH} levels")
    parts: list[Query] = []
    for key, value in sel.items():
        if not isinstance(key, str):
            raise InvalidQuery(f"selector keys are strings, not {key!r}")
        if key in COMBINATORS:
            parts.append(_combinator(key, value, counter, depth))
        elif key.startswith("$"):  # only at the top: _field takes objects with "$" keys
            known = " ".join(COMBINATORS)
            raise InvalidQuery(f"unknown operator {key!r} (supported here: {known})")
        else:
            parts.append(_field(prefix + check_path(key), value, counter, depth))
    return parts[0] if len(parts) == 1 else All(tuple(parts))


def _combinator(key: str, value: Any, counter: list[int], depth: int) -> Query:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or not value:
        what = "an empty list" if isinstance(value, Sequence) and not value else _kind(value)
        raise InvalidQuery(f"{key} takes a non-empty list of selectors, not {what}")
    parts = []
    for i, sub in enumerate(value):
        if not isinstance(sub, Mapping):
            raise InvalidQuery(f"{key}[{i}] must be a selector object, not {_kind(sub)}")
        parts.append(_object(sub, (), counter, depth + 1))
    if len(parts) == 1:
        return parts[0]
    return All(tuple(parts)) if key == "$and" else AnyOf(tuple(parts))


def _field(path: tuple[str, ...], value: Any, counter: list[int], depth: int) -> Query:
    """A field's value: a scalar (equality), an operator object, or nested fields."""
    field = ".".join(path)
    if isinstance(value, Mapping):
        if not value:
            raise InvalidQuery(f"field {field!r}: an empty object is no condition")
        ops = [k for k in value if isinstance(k, str) and k.startswith("$")]
        if not ops:
            return _object(value, path, counter, depth + 1)  # {"owner": {"team": "a"}}
        if len(ops) != len(value):
            raise InvalidQuery(
                f"field {field!r} mixes operators and field names; use 'a.b' for nested fields"
            )
        conds = [_operator(path, op, arg, counter) for op, arg in value.items()]
        return conds[0] if len(conds) == 1 else All(tuple(conds))
    return Cond(path, "eq", _scalar(value, f"field {field!r}", counter))


def _operator(path: tuple[str, ...], op: str, arg: Any, counter: list[int]) -> Query:
    field = ".".join(path)
    where = f"{op} on field {field!r}"
    if op not in OPERATORS:
        raise InvalidQuery(
            f"unknown operator {op!r} on field {field!r} (supported: {' '.join(OPERATORS)})"
        )
    name = op[1:]
    if name == "exists":
        if not isinstance(arg, bool):
            raise InvalidQuery(f"{where} takes true or false, not {_kind(arg)}")
        return Cond(path, "exists", arg)
    if name in ("in", "nin"):
        if not isinstance(arg, Sequence) or isinstance(arg, str | bytes):
            raise InvalidQuery(f"{where} takes a list of values, not {_kind(arg)}")
        values = tuple(_scalar(v, f"{where}, item {i}", counter) for i, v in enumerate(arg))
        return Cond(path, name, tuple(_keyed(values).values()))
    value = _scalar(arg, where, counter)
    if name in RANGES:
        if value is None:
            raise InvalidQuery(f"{where} compares numbers, strings or booleans, not null")
        if isinstance(value, bool):
            # Only two booleans: a range over them is equality with some of them
            # (not `$in`, which would look inside arrays).
            kept = [Cond(path, "eq", b) for b in (False, True) if _compare(name, b, value)]
            if not kept:
                return Cond(path, "in", ())  # matches nothing
            return kept[0] if len(kept) == 1 else AnyOf(tuple(kept))
    return Cond(path, name, value)


def _keyed(values: tuple[Scalar, ...]) -> dict[tuple[str, Scalar], Scalar]:
    """Deduplicate by JSON identity: 1 and 1.0 are one value, true and 1 are two."""
    out: dict[tuple[str, Scalar], Scalar] = {}
    for v in values:
        kind = "bool" if isinstance(v, bool) else "number" if isinstance(v, int | float) else "x"
        key = float(v) if kind == "number" and v is not None else v
        out.setdefault((kind, key), v)
    return out


def _scalar(value: Any, where: str, counter: list[int]) -> Scalar:
    counter[0] += 1
    if counter[0] > MAX_VALUES:
        raise InvalidQuery(f"the selector holds more than {MAX_VALUES} values; split the query")
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str):
            _check_text(value, where)
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidQuery(f"{where}: {value} is beyond the 64-bit integers stores keep")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidQuery(f"{where}: {value!r} is not a JSON number")
        return value
    if isinstance(value, Sequence | Mapping) and not isinstance(value, bytes):
        raise InvalidQuery(
            f"{where}: compares with JSON scalars (null, true/false, numbers, strings),"
            f" not {_kind(value)}"
        )
    raise InvalidQuery(f"{where}: {_kind(value)} is not a JSON value")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidQuery(f"{where}: the string holds a lone surrogate, not valid text") from None


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r:.40}"


def paths(query: Query) -> list[tuple[str, ...]]:
    """The fields a query reads, each once, in order."""
    if isinstance(query, Cond):
        return [query.path]
    return list(dict.fromkeys(p for q in query.parts for p in paths(q)))


# -- the reference meaning, in Python ------------------------------------------------

_MISSING = object()


def matches(query: Query, state: Any, decided: frozenset[Cond] = frozenset()) -> bool:
    """Whether a state matches: the meaning every store's translation must agree with.

    Stores without a query language scan with it; the tests compare stores against it.
    `decided`: conditions a store's server already found true for this state, by
    its own rules (Apache CouchDB orders strings by ICU collation, not code point).
    """
    if isinstance(query, All):
        return all(matches(q, state, decided) for q in query.parts)
    if isinstance(query, AnyOf):
        return any(matches(q, state, decided) for q in query.parts)
    if query in decided:
        return True
    value = state
    for key in query.path:
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            break
    op, arg = query.op, query.value
    if op == "exists":
        return (value is not _MISSING) is arg
    if value is _MISSING:
        return False
    if op == "eq":
        return _equal(value, arg)
    if op == "ne":
        return not _equal(value, arg)
    if op in ("in", "nin"):
        items = value if isinstance(value, list) else [value]
        found = any(_equal(item, v) for item in items for v in arg)
        return found if op == "in" else not found
    if _type(value) != _type(arg):
        return False
    return _compare(op, value, arg)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "gt":
        return bool(a > b)
    if op == "gte":
        return bool(a >= b)
    return bool(a < b) if op == "lt" else bool(a <= b)


def _equal(a: Any, b: Scalar) -> bool:
    return _type(a) == _type(b) and a == b


def _type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"
