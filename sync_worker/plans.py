"""Plans from Postgres into Redis: at start for every user with a subscription, at once for
a user named on the `quota_plans` NOTIFY channel, and again when a paid period has ended (so a
cancel at period end or a lapsed renewal reaches Redis without any call from the user).

Notifications come from a trigger on `subscriptions` (migration 0003), so a row changed by any
tool reaches Redis, not only the billing API's changes. They are read with psycopg 3's
`notifies()` generator on a connection of their own: callbacks do not fire on an idle
connection. A lost connection may have missed notifications, so after reconnecting the worker
makes a full pass again, and answers the notifications that arrive meanwhile between its pages.

A push reads the account at Redis' time, the clock Redis rolls periods by; lua/apply_plan.lua
refuses a period that is not current by that clock (a boundary passed in between), and the
push is read again, so a push never rolls a period back or starts the next one early.
"""

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import IntEnum

import psycopg
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.accounts import PLAN_CHANNEL, load_account
from quota_common.keys import user_keys
from quota_common.plans import Plan
from quota_common.redis_client import redis_now
from quota_common.schema import subscriptions
from quota_common.scripts import SCRIPTS, AnyRedis
from sync_worker import metrics

log = logging.getLogger("sync_worker.plans")

# Users pushed per query page in a full pass, and concurrent pushes.
PASS_PAGE_USERS = 1000
PUSH_CONCURRENCY = 16
# How long one wait for notifications lasts before the loop looks at its other duties.
NOTIFY_WAIT_S = 0.5
# Reads of one push whose period a boundary overtook before it reached Redis (one is rare).
PUSH_ATTEMPTS_MAX = 3


class PlanPush(IntEnum):
    """Mirrors the answers of lua/apply_plan.lua."""

    UNKNOWN_USER = 0
    APPLIED = 1
    NOT_CURRENT = 2


class PlanSync:
    def __init__(
        self,
        redis: AnyRedis,
        engine: AsyncEngine,
        conninfo: str,
        plans: dict[str, Plan],
        refresh_s: float,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.conninfo = conninfo
        self.plans = plans
        self.refresh_s = refresh_s
        self._listen: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._period_checked_at = datetime.now(UTC)
        self._needs_full_pass = True

    async def push_user(self, user_id: str) -> bool:
        """Applies the plan Postgres records for the user to Redis; True when Redis knew the
        user (and so was updated)."""
        state = [user_keys(user_id).state]
        for _ in range(PUSH_ATTEMPTS_MAX):
            now = await redis_now(self.redis)
            async with self.engine.connect() as conn:
                account = await load_account(conn, user_id, self.plans, now)
            pushed = await SCRIPTS["apply_plan"](self.redis, state, account.script_args())
            if pushed != PlanPush.NOT_CURRENT:
                return bool(pushed == PlanPush.APPLIED)
        log.warning("plan push overtaken by period ends", extra={"user_id": user_id})
        return False

    async def push(self, user_ids: Iterable[str], trigger: str) -> int:
        """Pushes each user's plan; returns how many Redis knew (and so updated)."""
        semaphore = asyncio.Semaphore(PUSH_CONCURRENCY)

        async def one(user_id: str) -> bool:
            async with semaphore:
                return await self.push_user(user_id)

        results = await asyncio.gather(*(one(user_id) for user_id in set(user_ids)))
        metrics.PLANS_APPLIED.labels(trigger).inc(len(results))
        return sum(results)

    async def full_pass(self) -> int:
        """Every user with a subscription row, page by page (keyset on user_id); between pages
        the users named by notifications meanwhile, so a long pass delays no plan change."""
        pushed = 0
        after = ""
        while True:
            pushed += await self.push_notified(0)
            async with self.engine.connect() as conn:
                page = (
                    await conn.scalars(
                        select(subscriptions.c.user_id)
                        .where(subscriptions.c.user_id > after)
                        .distinct()
                        .order_by(subscriptions.c.user_id)
                        .limit(PASS_PAGE_USERS)
                    )
                ).all()
            if not page:
                return pushed
            pushed += await self.push(page, "start")
            after = page[-1]

    async def period_end_pass(self) -> int:
        """Users whose paid period ended since the last look: Redis rolls the period itself,
        but only Postgres knows a cancel at period end or a subscription that lapsed."""
        now = datetime.now(UTC)
        since = self._period_checked_at - timedelta(seconds=5)
        async with self.engine.connect() as conn:
            users = (
                await conn.scalars(
                    select(subscriptions.c.user_id)
                    .where(
                        subscriptions.c.current_period_end > since,
                        subscriptions.c.current_period_end <= now,
                    )
                    .distinct()
                )
            ).all()
        self._period_checked_at = now
        return await self.push(users, "period_end") if users else 0

    async def listen(self) -> None:
        """Starts listening (the full pass follows in the first run_once)."""
        await self._connect()

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._listen is None or self._listen.closed or self._listen.broken:
            self._listen = await psycopg.AsyncConnection.connect(
                self.conninfo,
                autocommit=True,
                connect_timeout=5,
                application_name="quota-sync-worker-listen",
            )
            await self._listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(PLAN_CHANNEL)))
            # Listening before the pass: a change made during the pass is not missed.
            self._needs_full_pass = True
        return self._listen

    async def run_once(self, wait_s: float = NOTIFY_WAIT_S) -> int:
        """Waits up to wait_s for notifications and pushes the users named; makes the full
        pass first when (re)connected. Returns how many pushes reached Redis."""
        await self._connect()
        done = 0
        if self._needs_full_pass:
            # Cleared first: a reconnection during the pass (notifications missed) asks again.
            self._needs_full_pass = False
            done += await self.full_pass()
            self._period_checked_at = datetime.now(UTC)
        return done + await self.push_notified(wait_s)

    async def push_notified(self, wait_s: float) -> int:
        """Pushes the users named by notifications, waiting up to wait_s for the first."""
        conn = await self._connect()
        users: set[str] = set()
        async for notify in conn.notifies(timeout=wait_s, stop_after=1):
            users.add(notify.payload)
        if users:
            # Collect what is already queued behind the first one, and apply them together.
            async for notify in conn.notifies(timeout=0.005):
                users.add(notify.payload)
        return await self.push(users, "notify") if users else 0

    async def close(self) -> None:
        if self._listen is not None:
            await self._listen.close()
            self._listen = None
