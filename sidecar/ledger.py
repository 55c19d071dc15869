"""The sidecar's side of the Lua ledger: one script call per operation, the cold load of a user
Redis does not know (seeded from Postgres once, however many requests wait for it), and
Postgres' word on a reservation Redis has no record of (settled before Redis lost it, or more
than a day ago)."""

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.accounts import load_account
from quota_common.codes import Code
from quota_common.keys import UserKeys
from quota_common.plans import Plan
from quota_common.redis_client import redis_now
from quota_common.schema import usage_events
from quota_common.scripts import SCRIPTS, AnyRedis, LuaScript
from sidecar import metrics
from sidecar.outage import STORE_ERRORS, Breakers, StoreUnavailable
from sidecar.pipeline import ScriptPipeline

# Loads of a user that Redis keeps losing before the call lands, before answering 503.
LOAD_ATTEMPTS_MAX = 3


@dataclass(frozen=True, slots=True)
class Settled:
    """A reservation's settlement as Postgres recorded it (usage_events)."""

    status: str  # committed, refunded, expired
    tokens_reserved: int
    tokens_charged: int
    late: bool


class Ledger:
    def __init__(
        self,
        redis: AnyRedis,
        engine: AsyncEngine,
        plans: dict[str, Plan],
        alert_thresholds: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.plans = plans
        self.thresholds = ",".join(str(percent) for percent in alert_thresholds)
        self.breakers = Breakers(redis)
        self.pipeline = ScriptPipeline(redis, timeout_s)
        self._loading: dict[str, asyncio.Task[None]] = {}

    async def run(
        self, script: LuaScript, user: UserKeys, keys: list[str], args: list[Any]
    ) -> tuple[Code, list[Any]]:
        """Runs an operation script; a user unknown to Redis is seeded and the call repeated.
        Returns the script's code and the values after it (see each script's header)."""
        for _ in range(LOAD_ATTEMPTS_MAX):
            reply = await self.call(script, keys, args)
            if reply[0] != Code.NOT_LOADED:
                return Code(reply[0]), reply[1:]
            await self.ensure_loaded(user)
        # The state vanished again right after each load (Redis being flushed meanwhile).
        raise StoreUnavailable("the user's state could not be loaded into Redis")

    async def call(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        """One script call through the circuit breaker of the Redis (or cluster master) that
        holds the keys."""
        breaker = self.breakers.for_key(keys[0])
        breaker.check()
        try:
            result = await self.pipeline.call(script, keys, args)
        except STORE_ERRORS:
            breaker.failed()
            raise
        breaker.succeeded()
        return result

    async def ensure_loaded(self, user: UserKeys) -> None:
        # One Postgres load per user at a time in this process; the seed script makes the
        # loads of several processes harmless (the first one wins, nothing is added).
        task = self._loading.get(user.user_id)
        if task is None:
            task = asyncio.create_task(self._load(user))
            self._loading[user.user_id] = task
            task.add_done_callback(lambda done: self._loaded(user.user_id, done))
        await asyncio.shield(task)

    def _loaded(self, user_id: str, task: "asyncio.Task[None]") -> None:
        self._loading.pop(user_id, None)
        # Every caller may have given up (cancelled) meanwhile: the failure is theirs to hear,
        # and must not be reported as "never retrieved".
        if not task.cancelled():
            task.exception()

    async def _load(self, user: UserKeys) -> None:
        # The period by Redis' clock, which the scripts roll it by: at a period's end a load
        # must not seed the one that has just ended.
        now = await redis_now(self.redis)
        async with self.engine.connect() as conn:
            account = await load_account(conn, user.user_id, self.plans, now)
        seed_args = [*account.script_args(), user.record_prefix]
        if not await self.call(SCRIPTS["seed"], [user.state, user.holds], seed_args):
            return
        metrics.COLD_LOADS.inc()
        # A plan change committed while we read found no state to update and was not applied:
        # read once more and apply what changed since.
        async with self.engine.connect() as conn:
            fresh = await load_account(conn, user.user_id, self.plans, now)
        if fresh.plan_args() != account.plan_args():
            await self.call(SCRIPTS["apply_plan"], [user.state], fresh.script_args())

    async def reserve(
        self,
        user: UserKeys,
        reservation_id: str,
        tokens: int,
        min_tokens: int,
        ttl_ms: int,
        metadata: str,
    ) -> tuple[Code, list[Any]]:
        keys = user.reservation_keys(reservation_id)
        args = [
            user.user_id,
            reservation_id,
            tokens,
            min_tokens,
            ttl_ms,
            metadata,
            user.record_prefix,
        ]
        return await self.run(SCRIPTS["reserve"], user, keys, args)

    async def extend(
        self, user: UserKeys, reservation_id: str, tokens: int, ttl_ms: int
    ) -> tuple[Code, list[Any]]:
        keys = user.reservation_keys(reservation_id)
        args = [user.user_id, reservation_id, tokens, ttl_ms, user.record_prefix]
        return await self.run(SCRIPTS["extend"], user, keys, args)

    async def commit(
        self, user: UserKeys, reservation_id: str, tokens: int, metadata: str
    ) -> tuple[Code, list[Any]]:
        keys = user.reservation_keys(reservation_id)
        args = [user.user_id, reservation_id, tokens, metadata, user.record_prefix, self.thresholds]
        code, answer = await self.run(SCRIPTS["commit"], user, keys, [*args, "0"])
        if code != Code.NOT_FOUND:
            return code, answer
        settled = await self.settled(user, reservation_id)
        if settled is not None and settled.status == "committed":
            if settled.tokens_charged != tokens:
                return Code.IDEMPOTENCY_CONFLICT, []
            held = 0 if settled.late else settled.tokens_reserved
            released = max(held - settled.tokens_charged, 0)
            plan, limit, used, reserved, _, ps, pe = await self.usage_now(user)
            late = int(settled.late)
            return Code.REPLAYED, [
                tokens,
                released,
                used,
                reserved,
                limit,
                late,
                plan,
                ps,
                pe,
                held,
            ]
        if settled is not None and settled.status == "refunded":
            return Code.ALREADY_REFUNDED, []
        # Never settled, or its hold expired: a late commit, charged.
        return await self.run(SCRIPTS["commit"], user, keys, [*args, "1"])

    async def refund(self, user: UserKeys, reservation_id: str) -> tuple[Code, list[Any]]:
        keys = user.reservation_keys(reservation_id)
        args = [user.user_id, reservation_id, user.record_prefix]
        code, answer = await self.run(SCRIPTS["refund"], user, keys, args)
        if code != Code.NOT_FOUND:
            return code, answer
        settled = await self.settled(user, reservation_id)
        if settled is None:
            return code, answer
        if settled.status == "committed":
            return Code.ALREADY_COMMITTED, []
        plan, limit, used, reserved, _, ps, pe = await self.usage_now(user)
        replayed = Code.REPLAYED if settled.status == "refunded" else Code.OK
        return replayed, [
            settled.status,
            settled.tokens_reserved,
            used,
            reserved,
            limit,
            plan,
            ps,
            pe,
        ]

    async def settled(self, user: UserKeys, reservation_id: str) -> Settled | None:
        """How Postgres recorded the reservation's settlement, if it did."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(
                    usage_events.c.status,
                    usage_events.c.tokens_reserved,
                    usage_events.c.tokens_charged,
                    usage_events.c.late,
                ).where(
                    usage_events.c.user_id == user.user_id,
                    usage_events.c.reservation_id == reservation_id,
                )
            )
            row = result.first()
        return None if row is None else Settled(*row)

    async def usage(self, user: UserKeys) -> tuple[Code, str]:
        return await self.run_on_state(SCRIPTS["usage"], user)

    async def usage_now(self, user: UserKeys) -> list[str]:
        """usage.lua's fields: plan, limit, used, reserved, credits, ps, pe."""
        return (await self.usage(user))[1].split("|")

    async def run_on_state(
        self, script: LuaScript, user: UserKeys, *extra: Any
    ) -> tuple[Code, str]:
        """Runs a script of the usage.lua shape (usage, grant, reset): {code, "a|b|c"}."""
        keys = user.state_keys()
        code, values = await self.run(
            script, user, keys, [user.user_id, user.record_prefix, *extra]
        )
        return code, values[0].decode() if values else ""
