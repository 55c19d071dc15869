"""The GCRA limiter on its own: a burst of `limit`, then one request per 60/limit seconds."""

import pytest

from billing_api import ratelimit


def test_burst_then_one_per_interval() -> None:
    limiter = ratelimit.Limiter(limit=3)
    assert [ratelimit.hit(limiter, "a", now_s=100.0) for _ in range(4)] == [0, 0, 0, 20]
    # Refused requests take no token: waiting as told is enough.
    assert ratelimit.hit(limiter, "a", now_s=119.0) == 1
    assert ratelimit.hit(limiter, "a", now_s=120.0) == 0
    assert ratelimit.hit(limiter, "a", now_s=120.0) == 20
    # Another key has its own bucket.
    assert ratelimit.hit(limiter, "b", now_s=120.0) == 0


def test_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "KEYS_MAX", 2)
    limiter = ratelimit.Limiter(limit=1)
    assert ratelimit.hit(limiter, "a", now_s=0.0) == 0
    assert ratelimit.hit(limiter, "b", now_s=0.0) == 0
    # Full: new keys share the overflow bucket instead of growing the table.
    assert ratelimit.hit(limiter, "c", now_s=1.0) == 0
    assert ratelimit.hit(limiter, "d", now_s=1.0) > 0
    # Buckets that are full again are forgotten first.
    assert ratelimit.hit(limiter, "e", now_s=200.0) == 0
    assert len(limiter.full_at) == 1
