"""Sweeping expired holds of idle users: without it an idle user's `reserved` (and the
metrics) would count a hold past its expiry until the user's next call settled it.

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

        async def sweep(bucket: int, user: bytes) -> bool:
            user_id = user.decode()
            user_keys = keys.user_keys(user_id)
            async with semaphore:
                code, _ = await SCRIPTS["usage"](
                    self.redis,
                    [user_keys.state, user_keys.holds, user_keys.stream, user_keys.due],
                    [user_id, user_keys.record_prefix],
                )
                if code == Code.NOT_LOADED:
                    # Redis lost the user (its holds went with it): nothing left to sweep.
                    await self.redis.zrem(keys.due_set(bucket), user)
                    return False
            return True

        results = await asyncio.gather(
            *(sweep(bucket, user) for bucket, users in enumerate(due) for user in users)
        )
        swept = sum(results)
        if swept:
            metrics.REAPED.inc(swept)
        return swept
