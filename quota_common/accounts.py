"""A user's account as Postgres records it: plan, period, credits and usage so far. Redis state
is seeded from this whenever Redis does not know the user, and plan changes are pushed from it.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from quota_common.keys import user_keys
from quota_common.periods import calendar_month
from quota_common.plans import FREE, Plan
from quota_common.redis_client import redis_now
from quota_common.schema import credit_grants, subscriptions, usage_totals
from quota_common.scripts import SCRIPTS, AnyRedis

# Postgres NOTIFY channel: payload is a user id whose subscription changed; the sync worker
# listens and pushes that user's plan into Redis.
PLAN_CHANNEL = "quota_plans"

# Subscription statuses that keep the paid plan (past_due: Stripe is still retrying payment).
PAID_STATUSES = ("active", "trialing", "past_due")


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    plan: str
    quota: int
    credits: int
    used: int
    period_start: datetime
    period_end: datetime
    next_plan: str | None
    next_quota: int | None

    @property
    def limit(self) -> int:
        return self.quota + self.credits

    def plan_args(self) -> tuple[object, ...]:
        """What a plan change can alter (usage aside)."""
        return (
            self.plan,
            self.quota,
            self.credits,
            self.period_start,
            self.period_end,
            self.next_plan,
            self.next_quota,
        )

    def script_args(self) -> list[str | int]:
        """ARGV of lua/seed.lua and lua/apply_plan.lua."""
        return [
            self.plan,
            self.quota,
            self.credits,
            self.used,
            int(self.period_start.timestamp()),
            int(self.period_end.timestamp()),
            self.next_plan or "",
            self.next_quota if self.next_quota is not None else "",
        ]


def current_period(start: datetime, end: datetime, now: datetime) -> tuple[datetime, datetime]:
    """A paid period whose renewal has not been recorded yet repeats its length (as Lua does)."""
    if now < end:
        return start, end
    length = max(end - start, timedelta(seconds=1))
    skipped = (now - end) // length
    start = end + skipped * length
    return start, start + length


async def plan_period(
    conn: AsyncConnection, user_id: str, plans: dict[str, Plan], now: datetime
) -> tuple[str, datetime, datetime, str | None]:
    """The plan in force for the user at `now`, its period, and the plan that follows it."""
    row = (
        await conn.execute(
            select(
                subscriptions.c.plan,
                subscriptions.c.current_period_start,
                subscriptions.c.current_period_end,
                subscriptions.c.cancel_at_period_end,
            )
            .where(subscriptions.c.user_id == user_id, subscriptions.c.status.in_(PAID_STATUSES))
            .order_by(subscriptions.c.updated_at.desc(), subscriptions.c.id.desc())
            .limit(1)
        )
    ).first()
    if (
        row is None
        or row.plan not in plans
        or (row.cancel_at_period_end and row.current_period_end <= now)
    ):
        start, end = calendar_month(now)
        return FREE, start, end, None
    start, end = current_period(row.current_period_start, row.current_period_end, now)
    return row.plan, start, end, FREE if row.cancel_at_period_end else None


async def load_account(
    conn: AsyncConnection, user_id: str, plans: dict[str, Plan], now: datetime
) -> Account:
    plan, start, end, next_plan = await plan_period(conn, user_id, plans, now)
    used = await conn.scalar(
        select(usage_totals.c.tokens_charged).where(
            usage_totals.c.user_id == user_id, usage_totals.c.period_start == start
        )
    )
    credits = await conn.scalar(
        select(func.coalesce(func.sum(credit_grants.c.tokens), 0)).where(
            credit_grants.c.user_id == user_id, credit_grants.c.period_start == start
        )
    )
    return Account(
        user_id=user_id,
        plan=plan,
        quota=plans[plan].quota,
        credits=int(credits or 0),
        used=int(used or 0),
        period_start=start,
        period_end=end,
        next_plan=next_plan,
        next_quota=plans[next_plan].quota if next_plan else None,
    )


async def push_account(
    redis: AnyRedis, conn: AsyncConnection, user_id: str, plans: dict[str, Plan]
) -> int:
    """Applies the plan Postgres records for the user, in the period current by Redis' clock,
    to Redis at once (when Redis knows the user; otherwise the next call seeds it). Returns
    lua/apply_plan.lua's answer: 1 applied, 0 user unknown to Redis, 2 a period boundary
    passed meanwhile (the sync worker's push follows)."""
    account = await load_account(conn, user_id, plans, await redis_now(redis))
    answer = await SCRIPTS["apply_plan"](redis, [user_keys(user_id).state], account.script_args())
    return int(answer)
