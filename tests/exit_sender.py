"""A web worker told to stop: it sends, then exits normally while its listeners run.

Run by tests/test_lifetime.py: `exit_sender.py STORE_URL EFFECTS_FILE`. It never
calls close(); SIGTERM makes it leave its main loop and exit normally. Each
listener call appends the change's `id seq` to EFFECTS_FILE.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import casern

N = 5


def main(url: str, effects: str) -> None:
    def effect(change: casern.Change) -> None:
        time.sleep(0.5)  # still running when SIGTERM arrives
        with open(effects, "a") as f:
            f.write(f"{change.id} {change.seq}\n")

    def inc(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1}

    app = casern.Casern(url, {}, {}, {"inc": inc}, {"effect": effect})
    # As a web server's worker does on a graceful stop: leave the main loop, return.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    for i in range(N):
        app.send("inc", f"req-{i}")
    print("sent", flush=True)
    for _ in range(600):  # short sleeps: a signal another thread takes is seen soon
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
