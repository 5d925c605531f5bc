"""How listener failures are retried: exponential back-off with jitter (as Erlang and Nact do)."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Listener retries: `attempts` in all, delays from `initial` doubling up to `maximum`.

    Each delay is jittered (50–100% of its nominal value) so that many machines
    failing together do not retry in lock-step; `timeout` bounds one listener call.
    """

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 60.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.attempts, int)
            or isinstance(self.attempts, bool)
            or self.attempts < 1
        ):
            raise ValueError("Backoff(attempts=...) must be an int >= 1")
        if not 0 <= self.initial <= self.maximum or self.timeout <= 0:
            raise ValueError(
                "Backoff needs 0 <= initial <= maximum (seconds between retries) and timeout > 0"
            )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1-based)."""
        nominal: float = min(self.maximum, self.initial * 2 ** (failures - 1))
        return nominal * random.uniform(0.5, 1.0)
