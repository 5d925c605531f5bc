"""What every listener here derives from a change: its dedupe key, its JSON form."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from casern._change import Change

# Printable ASCII stays as it is, so ordinary ids read plainly in a header; '%', space,
# controls and non-ASCII are percent-encoded (UTF-8), since HTTP and mail headers must
# be ASCII and a newline in one would be header injection.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def header_value(text: str) -> str:
    """`text` made safe for an HTTP or mail header; `urllib.parse.unquote` reverses it."""
    return quote(text, safe=_HEADER_SAFE)


def dedupe_key(change: Change) -> str:
    """`<id>:<seq>` with the id header-encoded: unique per committed change."""
    return f"{header_value(change.id)}:{change.seq}"


def change_payload(change: Change) -> dict[str, Any]:
    """The change as a JSON object: what a webhook posts."""
    return {
        "id": change.id,
        "seq": change.seq,
        "reducer": change.reducer,
        "data": change.data,
        "key": change.key,
        "prev": change.prev,
        "state": change.state,
        "applied_at": change.applied_at.isoformat(),
    }
