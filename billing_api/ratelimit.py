"""Request limits per user and per client address for the mutating routes: GCRA (a token
bucket kept as one timestamp per key), so a client gets `limit` requests at once and then one
every 60/limit seconds, with no window edge where twice the limit gets through.

Kept in process memory: a billing API process sees few mutating calls, and the limit has to
hold even when Redis is down. With N processes a client gets at most N times the limit; the
numbers are set against abuse, not for fairness, so that is acceptable.
"""

import math
import time
from dataclasses import dataclass, field

PERIOD_S = 60.0
# Keys tracked at most, so a flood of addresses cannot grow memory without bound: past it,
# keys whose bucket is full again are forgotten first, then unknown keys share one bucket.
KEYS_MAX = 100_000
OVERFLOW_KEY = "<overflow>"


@dataclass(slots=True)
class Limiter:
    limit: int
    # Per key, the moment its bucket is full again ("theoretical arrival time"), monotonic s.
    full_at: dict[str, float] = field(default_factory=dict)

    @property
    def interval_s(self) -> float:
        return PERIOD_S / self.limit


def _make_room(limiter: Limiter, now: float) -> None:
    for key in [k for k, at in limiter.full_at.items() if at <= now]:
        del limiter.full_at[key]


def hit(limiter: Limiter, key: str, now_s: float | None = None) -> int:
    """Counts one request for `key`: 0 when allowed, else the whole seconds to wait."""
    now = time.monotonic() if now_s is None else now_s
    if key not in limiter.full_at and len(limiter.full_at) >= KEYS_MAX:
        _make_room(limiter, now)
        if len(limiter.full_at) >= KEYS_MAX:
            key = OVERFLOW_KEY
    full_at = max(limiter.full_at.get(key, now), now) + limiter.interval_s
    wait = full_at - now - PERIOD_S
    if wait > 0:
        # Refused requests take no token, so a client that waits as told gets through.
        return max(math.ceil(wait), 1)
    limiter.full_at[key] = full_at
    return 0
