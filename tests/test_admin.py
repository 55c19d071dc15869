"""Operator endpoints (reset, credits): bearer ADMIN_TOKEN, an audit row each, effect at once,
and both survive Redis losing everything (the state rebuilt from Postgres shows them)."""

from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import admin_audit, credit_grants, usage_totals
from tests.api import commit, reserve, usage
from tests.books import seed_used, snapshot

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
