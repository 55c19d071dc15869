"""Operator endpoints (reset, credits): bearer ADMIN_TOKEN (unset: disabled), an audit row
each, effect at once, also when Redis is in another period than Postgres or a plan push runs
at the same time, and both survive Redis losing everything (the state rebuilt from Postgres
shows them)."""

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import settings as settings_module
from quota_common.keys import user_keys
from quota_common.periods import rfc3339
from quota_common.plans import catalogue
from quota_common.schema import admin_audit, credit_grants, usage_totals
from sync_worker.plans import PlanSync
from tests.api import commit, reserve, usage
from tests.books import record_subscription, seed_used, snapshot
from tests.conftest import start_sidecar

ADMIN = {"Authorization": "Bearer test-admin-token"}


async def admin(
    http: httpx.AsyncClient,
    user: str,
    action: str,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> tuple[int, dict[str, Any]]:
    response = await http.post(
        f"/admin/v1/users/{user}/{action}", json=body, headers=ADMIN if headers is None else headers
    )
    return response.status_code, response.json()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "test-admin-token"},
        {"Authorization": "Basic dGVzdC1hZG1pbi10b2tlbg=="},
    ],
)
async def test_admin_needs_the_bearer_token(
    http: httpx.AsyncClient, redis: Redis, headers: dict[str, str]
) -> None:
    before = await snapshot(redis)
    for action, body in (("reset", {"reason": "x"}), ("credits", {"tokens": 5, "reason": "x"})):
        status, answer = await admin(http, "u1", action, headers, **body)
        assert status == 401 and answer["error"]["code"] == "unauthorized"
    assert await snapshot(redis) == before


async def test_credits_add_to_the_limit_and_are_audited(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    assert (await reserve(http, "u1", 1000, reservation_id="a"))[0] == 200
    status, body = await admin(http, "u1", "credits", tokens=5000, reason="outage apology")
    assert status == 200, body
    assert (body["limit"], body["credits"], body["reserved"]) == (105_000, 5000, 1000)
    status, body = await admin(http, "u1", "credits", tokens=1, reason="one more")
    assert status == 200 and body["limit"] == 105_001
    assert (await usage(http, "u1"))["remaining"] == 105_001 - 1000
    async with pg.connect() as conn:
        rows = (await conn.execute(select(admin_audit).order_by(admin_audit.c.id))).all()
        grants = (await conn.execute(select(credit_grants.c.tokens))).scalars().all()
    assert [(r.action, r.user_id, r.reason) for r in rows] == [
        ("credits", "u1", "outage apology"),
        ("credits", "u1", "one more"),
    ]
    assert rows[0].details["tokens"] == 5000 and rows[0].created_at is not None
    assert sorted(grants) == [1, 5000]


async def test_reset_zeroes_usage_and_is_audited(http: httpx.AsyncClient, pg: AsyncEngine) -> None:
    await seed_used(pg, "u1", 90_000)
    assert (await reserve(http, "u1", 10_000, reservation_id="a"))[0] == 200
    assert (await commit(http, "u1", "a", 10_000))[0] == 200
    assert (await reserve(http, "u1", 1))[0] == 429
    status, body = await admin(http, "u1", "reset", reason="support ticket 42")
    assert status == 200, body
    assert (body["used"], body["remaining"]) == (0, 100_000)
    assert (await reserve(http, "u1", 1))[0] == 200
    async with pg.connect() as conn:
        row = (await conn.execute(select(admin_audit))).one()
        total = await conn.scalar(select(usage_totals.c.tokens_charged))
    assert (row.action, row.user_id, row.reason) == ("reset", "u1", "support ticket 42")
    assert total == 0


async def test_reset_and_credits_survive_flushdb(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    await seed_used(pg, "u1", 50_000)
    assert (await admin(http, "u1", "reset", reason="r"))[0] == 200
    assert (await admin(http, "u1", "credits", tokens=2500, reason="c"))[0] == 200
    await redis.flushdb()
    now = await usage(http, "u1")
    assert (now["used"], now["credits"], now["limit"]) == (0, 2500, 102_500)


async def test_admin_for_an_unknown_user_seeds_it_first(http: httpx.AsyncClient) -> None:
    status, body = await admin(http, "newbie", "credits", tokens=10, reason="welcome")
    assert status == 200 and body["limit"] == 100_010 and body["used"] == 0


@pytest.mark.parametrize(
    ("action", "body"),
    [
        ("reset", {}),
        ("reset", {"reason": ""}),
        ("reset", {"reason": "   "}),
        ("reset", {"reason": "x" * 501}),
        ("reset", {"reason": "x", "extra": 1}),
        ("credits", {"reason": "x"}),
        ("credits", {"tokens": 0, "reason": "x"}),
        ("credits", {"tokens": 5.0, "reason": "x"}),
        ("credits", {"tokens": True, "reason": "x"}),
        ("credits", {"tokens": 10**9 + 1, "reason": "x"}),
        ("credits", {"tokens": 5}),
    ],
)
async def test_admin_bad_body_is_422_and_writes_nothing(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine, action: str, body: dict[str, Any]
) -> None:
    before = await snapshot(redis)
    status, answer = await admin(http, "u1", action, **body)
    assert status == 422 and answer["error"]["code"] == "validation_error"
    assert await snapshot(redis) == before
    async with pg.connect() as conn:
        assert (await conn.execute(select(admin_audit))).first() is None


async def test_admin_bad_user_id_is_422(http: httpx.AsyncClient) -> None:
    status, answer = await admin(http, "a%20b", "reset", reason="x")
    assert status == 422 and answer["error"]["code"] == "validation_error"


@pytest.fixture(scope="module")
def sidecar_without_admin_token(base_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    env = {name: value for name, value in base_env.items() if name != "ADMIN_TOKEN"}
    process, url = start_sidecar(env, logs_dir)
    yield url
    process.stop()


async def test_admin_endpoints_are_disabled_without_admin_token(
    sidecar_without_admin_token: str, redis: Redis, pg: AsyncEngine
) -> None:
    before = await snapshot(redis)
    async with httpx.AsyncClient(base_url=sidecar_without_admin_token, timeout=10) as http:
        for action, body in (("reset", {"reason": "x"}), ("credits", {"tokens": 5, "reason": "x"})):
            for headers in ({}, ADMIN):
                status, answer = await admin(http, "u1", action, headers, **body)
                assert status == 404 and answer["error"]["code"] == "not_found"
                assert "ADMIN_TOKEN" in answer["error"]["message"]
    assert await snapshot(redis) == before
    async with pg.connect() as conn:
        assert (await conn.execute(select(admin_audit))).first() is None


async def subscribe_pro(pg: AsyncEngine, user_id: str) -> datetime:
    """A PRO subscription recorded in Postgres that no push has brought to Redis yet (no
    worker runs here); returns its period start."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    await record_subscription(pg, user_id, "PRO", start, start + timedelta(days=30))
    return start


async def test_credits_when_redis_is_in_another_period_apply_postgres_period(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    assert (await usage(http, "mover"))["plan"] == "FREE"  # in Redis: the calendar month
    start = await subscribe_pro(pg, "mover")
    status, body = await admin(http, "mover", "credits", tokens=5000, reason="sorry")
    assert status == 200, body
    # The truth, not a grant Redis silently ignored: PRO's period, its limit and the credits.
    assert (body["plan"], body["credits"], body["limit"]) == ("PRO", 5000, 5_005_000)
    assert body["period_start"] == rfc3339(start)
    assert (await usage(http, "mover"))["credits"] == 5000
    async with pg.connect() as conn:
        grant_period = await conn.scalar(select(credit_grants.c.period_start))
    assert grant_period == start


async def test_reset_when_redis_is_in_another_period_resets_postgres_period(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    assert (await commit(http, "mover", "a", 3000))[0] == 200  # FREE month in Redis
    start = await subscribe_pro(pg, "mover")
    status, body = await admin(http, "mover", "reset", reason="r")
    assert status == 200, body
    assert (body["plan"], body["used"], body["period_start"]) == ("PRO", 0, rfc3339(start))
    async with pg.connect() as conn:
        row = (
            await conn.execute(select(usage_totals).where(usage_totals.c.period_start == start))
        ).one()
    assert row.tokens_charged == 0 and row.reset_position is not None


async def test_credits_granted_during_plan_pushes_are_never_taken_back(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine, base_env: dict[str, str]
) -> None:
    """Pushes read the grants while operators add more: a push that read before a grant's
    commit and lands after it must not set the credits back, not even for a moment."""
    settings = settings_module.load(base_env)
    plans = PlanSync(redis, pg, settings.database_url, catalogue(settings), 60)
    assert (await usage(http, "busy"))["credits"] == 0
    state = user_keys("busy").state
    grants = asyncio.gather(
        *(admin(http, "busy", "credits", tokens=10, reason=f"g{n}") for n in range(20))
    )
    seen: list[int] = []

    async def push_meanwhile() -> None:
        while not grants.done():
            await plans.push_user("busy")

    async def watch() -> None:
        while not grants.done():
            seen.append(int(await redis.hget(state, "credits") or 0))

    await asyncio.gather(watch(), *(push_meanwhile() for _ in range(4)))
    assert all(status == 200 for status, _ in await grants)
    assert seen == sorted(seen), "a push took granted credits back"
    async with pg.connect() as conn:
        granted = await conn.scalar(select(func.sum(credit_grants.c.tokens)))
    assert granted == 200
    assert (await usage(http, "busy"))["credits"] == 200
