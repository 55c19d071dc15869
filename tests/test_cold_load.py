"""A user unknown to Redis is loaded from Postgres (plan, limit, period, usage so far) and seeded
exactly once, even when a hundred first requests arrive together, and never inflated."""

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from quota_common.periods import calendar_month, rfc3339
from quota_common.schema import credit_grants, subscriptions, usage_totals
from quota_common.scripts import SCRIPTS
from tests.api import commit, reserve, usage
from tests.books import assert_books_balance, hash_of, record_subscription, seed_used, set_fields
from tests.conftest import start_sidecar

LIMIT = 100_000


@pytest.fixture(scope="module")
def second_sidecar(base_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """Another sidecar process on the same Redis and Postgres: first requests race across
    processes too, not only inside one."""
    process, url = start_sidecar(base_env, logs_dir)
    yield url
    process.stop()


async def test_first_call_seeds_plan_limit_credits_and_usage(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now - timedelta(days=5), now + timedelta(days=25)
    async with pg.begin() as conn:
        await conn.execute(
            insert(subscriptions).values(
                user_id="payer",
                stripe_subscription_id="sub_1",
                plan="PLUS",
                status="active",
                current_period_start=start,
                current_period_end=end,
            )
        )
        await conn.execute(
            insert(usage_totals).values(user_id="payer", period_start=start, tokens_charged=1234)
        )
        # Usage of an older period does not count.
        await conn.execute(
            insert(usage_totals).values(
                user_id="payer", period_start=start - timedelta(days=30), tokens_charged=999_999
            )
        )
        await conn.execute(
            insert(credit_grants).values(
                user_id="payer", tokens=500, period_start=start, reason="sorry"
            )
        )
    status, body = await reserve(http, "payer", 1000)
    assert status == 200, body
    assert (body["plan"], body["limit"], body["used"]) == ("PLUS", 1_000_500, 1234)
    assert (body["period_start"], body["period_end"]) == (rfc3339(start), rfc3339(end))
    now_usage = await usage(http, "payer")
    assert now_usage["credits"] == 500 and now_usage["remaining"] == 1_000_500 - 1234 - 1000


async def test_free_user_usage_so_far_comes_from_postgres(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    await seed_used(pg, "free", 4321)
    body = await usage(http, "free")
    start, end = calendar_month(datetime.now(UTC))
    assert (body["plan"], body["limit"], body["used"], body["reserved"]) == (
        "FREE",
        LIMIT,
        4321,
        0,
    )
    assert (body["period_start"], body["period_end"]) == (rfc3339(start), rfc3339(end))


async def test_canceled_or_unpaid_subscription_is_free(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    now = datetime.now(UTC)
    async with pg.begin() as conn:
        await conn.execute(
            insert(subscriptions).values(
                user_id="gone",
                plan="PRO",
                status="canceled",
                current_period_start=now - timedelta(days=1),
                current_period_end=now + timedelta(days=29),
            )
        )
    assert (await usage(http, "gone"))["plan"] == "FREE"


async def test_100_concurrent_first_requests_seed_once_and_never_over_grant(
    http: httpx.AsyncClient, second_sidecar: str, redis: Redis, pg: AsyncEngine
) -> None:
    base = LIMIT - 1000
    await seed_used(pg, "rush", base)
    tokens = 15
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=second_sidecar, limits=limits, timeout=30) as other:
        calls = [
            reserve(http if i % 2 else other, "rush", tokens, reservation_id=f"r{i}")
            for i in range(100)
        ]
        answers = await asyncio.gather(*calls)
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 1000 // tokens
    assert statuses.count(429) == 100 - 1000 // tokens
    assert all(body["used"] == base for _, body in answers)
    held = (1000 // tokens) * tokens
    await assert_books_balance(redis, "rush", base_used=base, charged=0, held=held)


async def test_reseeding_never_inflates_the_counters(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    await seed_used(pg, "again", 1000)
    assert (await reserve(http, "again", 300, reservation_id="a"))[0] == 200
    assert (await commit(http, "again", "a", 200))[0] == 200
    before = await hash_of(redis, user_keys("again").state)
    # Seeding again (a second process losing the race, or a retried load) sets nothing.
    keys = user_keys("again")
    state = keys.state
    ps, pe = before[b"ps"].decode(), before[b"pe"].decode()
    args = ["FREE", LIMIT, 0, 1000, ps, pe, "", "", keys.record_prefix]
    assert await SCRIPTS["seed"](redis, [state, keys.holds], args) == 0
    assert await SCRIPTS["seed"](redis, [state, keys.holds], args) == 0
    assert await hash_of(redis, state) == before
    now = await usage(http, "again")
    assert (now["used"], now["reserved"]) == (1200, 0)
    await assert_books_balance(redis, "again", base_used=1000, charged=200, held=0)


async def subscribe(
    pg: AsyncEngine, user: str, start: datetime, end: datetime, cancel_at_period_end: bool = False
) -> None:
    await record_subscription(
        pg, user, "PLUS", start, end, cancel_at_period_end=cancel_at_period_end
    )


async def test_paid_period_not_yet_renewed_repeats_its_length(
    http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    end = now - timedelta(days=10)
    await subscribe(pg, "late-renewal", end - timedelta(days=30), end)
    body = await usage(http, "late-renewal")
    assert (body["plan"], body["limit"]) == ("PLUS", 1_000_000)
    assert body["period_start"] == rfc3339(end)
    assert body["period_end"] == rfc3339(end + timedelta(days=30))


async def test_cancel_at_period_end_falls_back_to_free_at_the_end(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await subscribe(pg, "leaving", now - timedelta(days=20), now + timedelta(days=10), True)
    body = await usage(http, "leaving")
    assert (body["plan"], body["limit"]) == ("PLUS", 1_000_000)
    # The period ends (moved in Redis, as in test_expiry_rollover): FREE takes over by itself.
    await set_fields(redis, user_keys("leaving").state, pe=int(now.timestamp()) - 1)
    body = await usage(http, "leaving")
    start, end = calendar_month(now)
    assert (body["plan"], body["limit"], body["used"]) == ("FREE", LIMIT, 0)
    assert (body["period_start"], body["period_end"]) == (rfc3339(start), rfc3339(end))
    # A canceled subscription whose end has passed is FREE from the first load.
    await subscribe(pg, "gone2", now - timedelta(days=40), now - timedelta(days=10), True)
    assert (await usage(http, "gone2"))["plan"] == "FREE"


async def test_holds_that_outlive_the_state_still_count(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    """The state hash is lost (deleted by hand) while a hold survives: the cold load counts the
    hold again, so nothing is granted twice and its commit settles it as usual."""
    await seed_used(pg, "orphan", LIMIT - 1000)
    assert (await reserve(http, "orphan", 600, reservation_id="kept"))[0] == 200
    await redis.delete(user_keys("orphan").state)
    status, body = await reserve(http, "orphan", 1000)
    assert status == 429 and body["reserved"] == 600 and body["remaining"] == 400
    status, body = await commit(http, "orphan", "kept", 600)
    assert status == 200 and body["reserved"] == 0 and body["late"] is False
    assert (await usage(http, "orphan"))["remaining"] == 400
