"""GET /api/usage (live, through the sidecar's script) and /api/usage/history (usage_events):
a new user with nothing works, holds and commits show, alerts fired are listed, and history
is the user's own, per day and per metadata value."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from quota_common.periods import calendar_month
from quota_common.schema import usage_alerts, usage_events
from tests.api import commit, reserve
from tests.billing.helpers import auth
from tests.books import record_subscription


async def test_a_new_user_has_free_usage_and_nothing_is_seeded(
    billing: httpx.AsyncClient, redis: Redis
) -> None:
    reply = await billing.get("/api/usage", headers=auth("use-new"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    start, end = calendar_month(datetime.now(UTC))
    assert body["ok"] is True and body["plan"] == "FREE"
    assert (body["limit"], body["used"], body["reserved"], body["remaining"]) == (
        100_000,
        0,
        0,
        100_000,
    )
    assert body["period"] == {
        "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    assert body["alerts"] == [] and body["source"] == "recorded"
    # The sidecar seeds users itself (re-reading plan changes made meanwhile); a second seeder
    # could put a plan that was just replaced into Redis.
    assert not await redis.exists(user_keys("use-new").state)


async def test_usage_shows_what_the_sidecar_holds_and_the_alerts_fired(
    billing: httpx.AsyncClient, http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    user = "use-1"
    status, _ = await reserve(http, user, 85_000, reservation_id="r1")
    assert status == 200
    status, _ = await commit(http, user, "r1", 84_000)
    assert status == 200
    status, _ = await reserve(http, user, 1_000, reservation_id="r2")
    assert status == 200
    start, end = calendar_month(datetime.now(UTC))
    async with pg.begin() as conn:
        await conn.execute(
            insert(usage_alerts).values(
                user_id=user,
                threshold=80,
                period_start=start,
                period_end=end,
                limit=100_000,
                used=84_000,
            )
        )
        # Another period's alert and another user's are not this period's.
        await conn.execute(
            insert(usage_alerts),
            [
                {
                    "user_id": user,
                    "threshold": 90,
                    "period_start": start - timedelta(days=31),
                    "period_end": start,
                    "limit": 1,
                    "used": 1,
                },
                {
                    "user_id": "use-other",
                    "threshold": 100,
                    "period_start": start,
                    "period_end": end,
                    "limit": 1,
                    "used": 1,
                },
            ],
        )
    body = (await billing.get("/api/usage", headers=auth(user))).json()
    assert body["source"] == "live"
    assert (body["used"], body["reserved"], body["remaining"]) == (84_000, 1_000, 15_000)
    assert [alert["threshold"] for alert in body["alerts"]] == [80]


def event(user: str, rid: str, tokens: int, when: datetime, **metadata: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "reservation_id": rid,
        "status": "committed" if tokens else "expired",
        "tokens_reserved": tokens + 10,
        "tokens_charged": tokens,
        "late": False,
        "metadata": metadata,
        "period_start": calendar_month(when)[0],
        "settled_at": when,
    }


async def test_history_per_day_and_per_conversation(
    billing: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    user = "use-2"
    day = datetime(2026, 3, 10, 23, 30, tzinfo=UTC)
    async with pg.begin() as conn:
        await conn.execute(
            insert(usage_events),
            [
                event(user, "a", 100, day, conversation_id="c1", model="m"),
                event(user, "b", 50, day + timedelta(minutes=40), conversation_id="c1"),
                event(user, "c", 30, day + timedelta(days=1), conversation_id="c2"),
                event(user, "d", 0, day + timedelta(days=1), conversation_id="c2"),
                event(user, "e", 7, day + timedelta(days=2)),
                event(user, "f", 999, day - timedelta(days=30), conversation_id="c1"),
                event("use-other", "a", 5000, day, conversation_id="c1"),
            ],
        )
    reply = await billing.get(
        "/api/usage/history",
        params={"from": "2026-03-10", "to": "2026-03-13", "group_by": "conversation_id"},
        headers=auth(user),
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["from"] == "2026-03-10" and body["to"] == "2026-03-13"
    assert [(d["date"], d["tokens"], d["calls"]) for d in body["days"]] == [
        ("2026-03-10", 100, 1),
        ("2026-03-11", 80, 2),
        ("2026-03-12", 7, 1),
        ("2026-03-13", 0, 0),
    ]
    assert body["total_tokens"] == 187
    assert body["group_by"] == "conversation_id"
    assert [(g["key"], g["tokens"], g["calls"]) for g in body["groups"]] == [
        ("c1", 150, 2),
        ("c2", 30, 1),
        (None, 7, 1),
    ]


async def test_history_defaults_to_the_current_period(
    billing: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    user = "use-3"
    now = datetime.now(UTC)
    start, end = calendar_month(now)
    async with pg.begin() as conn:
        await conn.execute(insert(usage_events), [event(user, "a", 42, now)])
    body = (await billing.get("/api/usage/history", headers=auth(user))).json()
    assert body["from"] == start.date().isoformat()
    assert body["to"] == (end - timedelta(days=1)).date().isoformat()
    assert len(body["days"]) == (end - start).days
    assert body["total_tokens"] == 42 and "groups" not in body


async def test_the_default_history_counts_this_period_only(
    billing: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    """A paid period starting at noon shares its first day with the previous period: that
    day's usage before noon belongs to the previous period and is not counted."""
    user = "use-5"
    start = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    start -= timedelta(days=2)
    end, before = start + timedelta(days=30), start - timedelta(days=30)
    previous = {**event(user, "old", 500, start - timedelta(hours=1)), "period_start": before}
    first = {**event(user, "new", 70, start + timedelta(hours=1)), "period_start": start}
    await record_subscription(pg, user, "PLUS", start, end, stripe_subscription_id="sub_use5")
    async with pg.begin() as conn:
        await conn.execute(insert(usage_events), [previous, first])
    body = (await billing.get("/api/usage/history", headers=auth(user))).json()
    assert body["from"] == start.date().isoformat()
    assert body["to"] == end.date().isoformat()
    assert body["total_tokens"] == 70
    assert body["days"][0] == {"date": start.date().isoformat(), "tokens": 70, "calls": 1}
    # Explicit days are whole UTC days, whatever period the usage belonged to.
    day = start.date().isoformat()
    body = (
        await billing.get("/api/usage/history", params={"from": day, "to": day}, headers=auth(user))
    ).json()
    assert body["total_tokens"] == 570


async def test_bad_history_queries_are_422(billing: httpx.AsyncClient) -> None:
    headers = auth("use-4")
    for params in (
        {"from": "2026-03-10"},
        {"from": "2026-03-10", "to": "2026-03-01"},
        {"from": "2026-03-10", "to": "tomorrow"},
        {"from": "20260310", "to": "2026-03-11"},
        {"from": "2024-01-01", "to": "2026-01-01"},
        {"group_by": ""},
        {"group_by": "k" * 65},
        {"group_by": "conversation\x00id"},
        {"group_by": "line\nbreak"},
        {"user_id": "someone-else"},
    ):
        reply = await billing.get("/api/usage/history", params=params, headers=headers)
        assert reply.status_code == 422, (params, reply.text)
        assert reply.json()["error"]["code"] == "validation_error"
    reply = await billing.get("/api/usage", params={"user_id": "x"}, headers=headers)
    assert reply.status_code == 422
