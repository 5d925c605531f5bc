"""The one rule for machine ids, shared by every store.

An id is kept exactly as given (`/`, `?`, `#`, `..`, spaces and unicode all
round-trip), except what no store can hold safely: it is refused with
`InvalidId` rather than mapped, so no two ids can ever meet in one document.
"""

from __future__ import annotations

import re
from typing import Any

from ._errors import InvalidId

MAX_ID_LENGTH = 1024

# C0/C1 control characters (newline, tab, NUL ...) and the Unicode line and
# paragraph separators would break `casern ls`,
# logs and HTTP paths; lone surrogates cannot be encoded as UTF-8.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_id(id: Any) -> str:
    """Return `id` unchanged if it can be stored, else raise `InvalidId` saying why."""
    if not isinstance(id, str):
        raise InvalidId(f"an id must be a str, not {type(id).__name__}: {id!r:.60}")
    if not id:
        raise InvalidId("an id must not be empty")
    if len(id) > MAX_ID_LENGTH:
        raise InvalidId(f"an id must be at most {MAX_ID_LENGTH} characters, this one has {len(id)}")
    if id[0] == "_":
        raise InvalidId(
            f"an id must not start with '_' (CouchDB reserves _design/, _local/ ...): {id!r:.60}"
        )
    if _UNSAFE.search(id):
        raise InvalidId(f"an id must not contain control characters or lone surrogates: {id!r:.60}")
    return id
