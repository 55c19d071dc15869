"""Sweeping expired holds of idle users: without it an idle user's `reserved` (and the
metrics) would count a hold past its expiry until the user's next call settled it. And the
tokens on hold in all of Redis, for the quota_held_tokens gauge.

Each bucket's due set maps user -> earliest hold expiry (never late, maybe early). For every
user due, lua/usage.lua rolls the period, settles the expired holds into the stream and fixes
the due score, in one call. Several workers may reap the same user: the script is idempotent.
"""

import asyncio
import logging

from quota_common import keys
from quota_common.codes import Code
from quota_common.scripts import SCRIPTS, AnyRedis
from sync_worker import metrics

log = logging.getLogger("sync_worker.reaper")

# Users per bucket per pass, and concurrent script calls.
REAP_USERS_MAX = 256
REAP_CONCURRENCY = 32


class Reaper:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis

    async def run_once(self) -> int:
        """One pass over every bucket's due set; returns how many users were swept."""
        seconds, micros = await self.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(keys.BUCKETS):
            pipe.zrangebyscore(keys.due_set(bucket), "-inf", now_ms, start=0, num=REAP_USERS_MAX)
        due = await pipe.execute()
        semaphore = asyncio.Semaphore(REAP_CONCURRENCY)

        async def sweep(user: bytes) -> bool:
            user_id = user.decode()
            user_keys = keys.user_keys(user_id)
            async with semaphore:
                code, _ = await SCRIPTS["usage"](
                    self.redis,
                    user_keys.state_keys(),
                    [user_id, user_keys.record_prefix],
                )
                if code == Code.NOT_LOADED:
                    # Redis lost the user: the script dropped its due entry, nothing to sweep.
                    return False
            return True

        results = await asyncio.gather(*(sweep(user) for users in due for user in users))
        swept = sum(results)
        if swept:
            metrics.REAPED.inc(swept)
        return swept


# Users whose `reserved` one pipeline reads, when the held tokens are summed.
HELD_READ_CHUNK = 1024


async def held_tokens(redis: AnyRedis) -> int:
    """The sum of `reserved` over the users that may hold tokens: those in a due set (every
    user with an open hold is, maybe with an early score). Off the hot path on purpose: one
    read per such user every sample, instead of a counter every reserve would have to move."""
    pipe = redis.pipeline(transaction=False)
    for bucket in range(keys.BUCKETS):
        pipe.zrange(keys.due_set(bucket), 0, -1)
    users = [user.decode() for members in await pipe.execute() for user in members]
    total = 0
    for first in range(0, len(users), HELD_READ_CHUNK):
        pipe = redis.pipeline(transaction=False)
        for user in users[first : first + HELD_READ_CHUNK]:
            pipe.hget(keys.user_keys(user).state, "reserved")
        total += sum(int(value or 0) for value in await pipe.execute())
    metrics.HELD.set(total)
    return total
