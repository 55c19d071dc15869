"""Drift between Redis and Postgres: after Redis restarted from an older snapshot, a user's
`used` can be below what Postgres already recorded for the period. The worker raises it back
(lua/raise_used.lua) and reports how far apart the two were, in both directions: Redis above
Postgres (a charge counted twice, a reset Redis lost) is measured and logged, never lowered,
since Redis may hold charges Postgres cannot tell apart from a double count.

Postgres is only a valid floor for a bucket whose stream is fully processed: the worker reads
each stream's last id first, then the totals, and the script refuses the raise if anything was
settled since (or is still pending), so a reset or a charge in flight never gets undone.
"""

import logging
from datetime import UTC, datetime, timedelta
from enum import IntEnum

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import keys
from quota_common.codes import Code
from quota_common.schema import usage_totals
from quota_common.scripts import SCRIPTS, AnyRedis
from sync_worker import metrics

log = logging.getLogger("sync_worker.drift")

# Totals rows looked at per pass (the most recently changed first).
DRIFT_USERS_MAX = 10_000


class RaiseResult(IntEnum):
    """Mirrors the codes of lua/raise_used.lua."""

    OK = Code.OK
    NOT_LOADED = Code.NOT_LOADED
    STALE = 2


class DriftRepair:
    def __init__(self, redis: AnyRedis, engine: AsyncEngine, window_s: int) -> None:
        self.redis = redis
        self.engine = engine
        self.window_s = window_s

    async def caught_up_streams(self) -> dict[int, str]:
        """Bucket -> last id of each stream whose every entry is already in Postgres."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(keys.BUCKETS):
            pipe.exists(keys.settle_stream(bucket))
            pipe.xinfo_stream(keys.settle_stream(bucket))
            pipe.xinfo_groups(keys.settle_stream(bucket))
        answers = await pipe.execute(raise_on_error=False)
        caught_up: dict[int, str] = {}
        for bucket in range(keys.BUCKETS):
            exists, stream, groups = answers[3 * bucket : 3 * bucket + 3]
            if not exists:
                caught_up[bucket] = "0-0"
                continue
            if isinstance(stream, Exception) or isinstance(groups, Exception):
                continue
            last_id = _text(stream["last-generated-id"])
            for group in groups:
                if (
                    _text(group["name"]) == keys.SETTLE_GROUP
                    and int(group["pending"]) == 0
                    and _text(group["last-delivered-id"]) == last_id
                ):
                    caught_up[bucket] = last_id
        return caught_up

    async def run_once(self) -> int:
        """One pass; returns the tokens Redis was below Postgres (and was raised by). Totals
        of 0 count too: a reset user whose Redis `used` is above 0 has drifted."""
        caught_up = await self.caught_up_streams()
        since = datetime.now(UTC) - timedelta(seconds=self.window_s)
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        usage_totals.c.user_id,
                        usage_totals.c.period_start,
                        usage_totals.c.tokens_charged,
                    )
                    .where(usage_totals.c.updated_at >= since)
                    .order_by(usage_totals.c.updated_at.desc())
                    .limit(DRIFT_USERS_MAX)
                )
            ).all()
        raised = above = above_users = 0
        for user_id, period_start, tokens in rows:
            bucket = keys.bucket_of(user_id)
            last_id = caught_up.get(bucket)
            if last_id is None:
                continue
            user = keys.user_keys(user_id)
            code, used = await SCRIPTS["raise_used"](
                self.redis,
                [user.state, user.stream],
                [int(period_start.timestamp()), int(tokens), last_id, keys.SETTLE_GROUP],
            )
            if code != RaiseResult.OK:
                continue
            difference = int(used) - int(tokens)
            if difference < 0:
                log.warning(
                    "redis usage raised to postgres",
                    extra={"user_id": user_id, "tokens": -difference},
                )
                raised -= difference
            elif difference > 0:
                above += difference
                above_users += 1
        if above:
            # One line per pass: the same users stay above until their period ends.
            log.warning(
                "redis usage above postgres, left alone",
                extra={"users": above_users, "tokens": above},
            )
        metrics.DRIFT.labels("below").set(raised)
        metrics.DRIFT.labels("above").set(above)
        if raised:
            metrics.DRIFT_RAISED.inc(raised)
        return raised


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
