"""What a change did to a state: a flat list of added, removed and changed paths.

A timeline that shows two JSON blobs makes people play spot-the-difference; a
list of `path: old → new` lines says it at once. Lists are compared item by
item when their length is kept, as appended or dropped items when one is a
prefix of the other, and as one changed value otherwise.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .._fold import same

__all__ = ["diff", "format_path"]

_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*\Z")

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """`a.b[2]["odd key"]`: readable, and unambiguous for keys with dots or spaces."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out or "(the whole state)"


def _same(a: Any, b: Any) -> bool:
    # JSON equality: true is not 1, 1 is not "1"; `==` first, it fails fast in C.
    return bool(a == b) and same(a, b)


def diff(old: Any, new: Any, path: Path = ()) -> list[dict[str, Any]]:
    """Changes from `old` to `new`: dicts with `path`, `op` (add, remove, change), `old`, `new`.

    Equal parts are not walked: a timeline diffs every change of a machine, and
    a state that grows by appending (a chat's messages) would cost each change
    a look at everything appended before.
    """
    if _same(old, new):
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[dict[str, Any]] = []
        for key in old:
            if key not in new:
                out.append({"path": format_path((*path, key)), "op": "remove", "old": old[key]})
            else:
                out += diff(old[key], new[key], (*path, key))
        for key in new:
            if key not in old:
                out.append({"path": format_path((*path, key)), "op": "add", "new": new[key]})
        return out
    if isinstance(old, list) and isinstance(new, list):
        n = min(len(old), len(new))
        if len(old) == len(new):
            out = []
            for i in range(n):
                out += diff(old[i], new[i], (*path, i))
            return out
        if _same(old[:n], new[:n]):  # items appended or dropped at the end
            out = []
            for i in range(n, len(new)):
                out.append({"path": format_path((*path, i)), "op": "add", "new": new[i]})
            for i in range(n, len(old)):
                out.append({"path": format_path((*path, i)), "op": "remove", "old": old[i]})
            return out
    return [{"path": format_path(path), "op": "change", "old": old, "new": new}]
