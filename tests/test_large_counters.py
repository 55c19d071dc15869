"""Counters far beyond any plan (late commits of 10^9 tokens add up) still answer exact
integers: Lua's default number format would print 10^14 as 1e+14."""

import httpx
from redis.asyncio import Redis

from quota_common.keys import user_keys
from tests.api import commit, reserve, usage


async def test_used_beyond_1e14_stays_exact(http: httpx.AsyncClient, redis: Redis) -> None:
    assert (await reserve(http, "whale", 1))[0] == 200
    await redis.hset(user_keys("whale").state, "used", 99_999_500_000_000)
    for i in range(2):
        status, body = await commit(http, "whale", f"late-{i}", 10**9)
        assert status == 200 and body["late"] is True
    assert body["used"] == 99_999_500_000_000 + 2 * 10**9
    replay_status, replay = await commit(http, "whale", "late-1", 10**9)
    assert replay_status == 200 and replay["replayed"] is True and replay["used"] == body["used"]
    assert (await usage(http, "whale"))["used"] == body["used"]
    status, refused = await reserve(http, "whale", 1)
    assert status == 429 and refused["remaining"] == 0
