"""What a user has used: live from Redis through the sidecar's own Lua script (so the numbers
are the ones the sidecar enforces, holds included), and history from Postgres `usage_events`.

When Redis does not know the user (a brand-new user, or Redis lost its state) or is down, the
answer is what Postgres records (`"source": "recorded"`: settled usage, no open holds), which
is exactly what the sidecar will start from. Nothing is seeded from here: the sidecar seeds a
user itself and re-reads any plan change committed meanwhile, which a second seeder would race.
"""

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import Date, cast, func, select

from billing_api.services import Services
from quota_common.accounts import load_account, plan_period
from quota_common.codes import Code
from quota_common.keys import user_keys
from quota_common.periods import from_unix, rfc3339
from quota_common.schema import usage_alerts, usage_events
from quota_common.scripts import SCRIPTS

GROUPS_MAX = 100


async def _live(services: Services, user_id: str) -> list[str] | None:
    """The sidecar's numbers; None when Redis does not hold the user."""
    keys = user_keys(user_id)
    script_keys = keys.state_keys()
    args = [user_id, keys.record_prefix]
    code, answer = await SCRIPTS["usage"](services.redis, script_keys, args)
    if code != Code.OK:
        return None
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    return text.split("|")


async def current(services: Services, user_id: str) -> dict[str, Any]:
    try:
        fields = await _live(services, user_id)
    except (RedisError, OSError, TimeoutError):
        fields = None
    if fields is not None:
        plan, limit, used, reserved, credits, ps, pe = fields
        start, end = from_unix(ps), from_unix(pe)
        numbers = (int(limit), int(used), int(reserved), int(credits))
        source = "live"
    else:
        async with services.engine.connect() as conn:
            account = await load_account(conn, user_id, services.plans, datetime.now(UTC))
        plan, start, end = account.plan, account.period_start, account.period_end
        numbers = (account.limit, account.used, 0, account.credits)
        source = "recorded"
    limit_n, used_n, reserved_n, credits_n = numbers
    async with services.engine.connect() as conn:
        alerts = (
            await conn.execute(
                select(usage_alerts.c.threshold, usage_alerts.c.triggered_at)
                .where(usage_alerts.c.user_id == user_id, usage_alerts.c.period_start == start)
                .order_by(usage_alerts.c.threshold)
            )
        ).all()
    return {
        "ok": True,
        "user_id": user_id,
        "plan": plan,
        "limit": limit_n,
        "used": used_n,
        "reserved": reserved_n,
        "remaining": max(limit_n - used_n - reserved_n, 0),
        "credits": credits_n,
        "period": {"start": rfc3339(start), "end": rfc3339(end)},
        "period_start": rfc3339(start),
        "period_end": rfc3339(end),
        "alerts": [
            {"threshold": row.threshold, "triggered_at": rfc3339(row.triggered_at)}
            for row in alerts
        ],
        "source": source,
    }


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


async def history(
    services: Services, user_id: str, first: date | None, last: date | None, group_by: str | None
) -> dict[str, Any]:
    """Tokens charged per UTC day from `first` to `last` (both included), and, with
    `group_by`, totals per value of that metadata key. By default the current period: its
    days, counting only the usage of this period (a period starting mid-day shares its first
    day with the previous one)."""
    async with services.engine.connect() as conn:
        if first is None or last is None:
            _, start, end, _ = await plan_period(conn, user_id, services.plans, datetime.now(UTC))
            first, last = start.date(), (end - timedelta(microseconds=1)).date()
            within: tuple[Any, ...] = (
                usage_events.c.period_start >= start,
                usage_events.c.period_start < end,
            )
        else:
            within = (
                usage_events.c.settled_at >= _midnight(first),
                usage_events.c.settled_at < _midnight(last + timedelta(days=1)),
            )
        mine = (usage_events.c.user_id == user_id, *within)
        day = cast(func.timezone("UTC", usage_events.c.settled_at), Date).label("day")
        tokens = func.coalesce(func.sum(usage_events.c.tokens_charged), 0).label("tokens")
        calls = func.count().filter(usage_events.c.tokens_charged > 0).label("calls")
        per_day = {
            row.day: row
            for row in (
                await conn.execute(select(day, tokens, calls).where(*mine).group_by(day))
            ).all()
        }
        groups: list[dict[str, Any]] | None = None
        if group_by is not None:
            key = usage_events.c.metadata[group_by].astext.label("key")
            rows = (
                await conn.execute(
                    select(key, tokens, calls)
                    .where(*mine)
                    .group_by(key)
                    .order_by(tokens.desc(), key)
                    .limit(GROUPS_MAX)
                )
            ).all()
            groups = [{"key": r.key, "tokens": int(r.tokens), "calls": r.calls} for r in rows]
    days = []
    for offset in range((last - first).days + 1):
        today = first + timedelta(days=offset)
        row = per_day.get(today)
        days.append(
            {
                "date": today.isoformat(),
                "tokens": int(row.tokens) if row else 0,
                "calls": row.calls if row else 0,
            }
        )
    answer: dict[str, Any] = {
        "ok": True,
        "user_id": user_id,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "total_tokens": sum(d["tokens"] for d in days),
        "days": days,
    }
    if groups is not None:
        answer["group_by"] = group_by
        answer["groups"] = groups
    return answer
