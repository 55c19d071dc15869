"""When Redis or Stripe is down: Redis down only delays the push (Postgres keeps the record and
usage falls back to it); Stripe down is a 503 to retry, and a webhook that could not be
applied is not remembered, so Stripe's retry applies it; Stripe hanging holds up nobody but
the users waiting for it."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import customers, stripe_events
from tests.billing.faults import Blackhole
from tests.billing.helpers import Keys, auth, send_event, start_billing
from tests.servers import eventually, free_port


@pytest.fixture
def billing_without_redis(
    base_env: dict[str, str], logs_dir: Path, localstripe_url: str, keys: Keys
) -> Iterator[str]:
    process, url = start_billing(
        base_env,
        logs_dir,
        localstripe_url,
        keys,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        REDIS_TIMEOUT_MS="200",
    )
    yield url
    process.stop()


@pytest.fixture
def billing_without_stripe(
    base_env: dict[str, str], logs_dir: Path, localstripe_url: str, keys: Keys
) -> Iterator[str]:
    dead = f"http://127.0.0.1:{free_port()}"
    process, url = start_billing(base_env, logs_dir, localstripe_url, keys, STRIPE_API_BASE=dead)
    yield url
    process.stop()


async def test_redis_down_subscribe_still_records_and_usage_reads_postgres(
    billing_without_redis: str,
) -> None:
    headers = auth("deg-1")
    async with httpx.AsyncClient(base_url=billing_without_redis, timeout=30) as client:
        reply = await client.post(
            "/api/subscribe",
            json={"plan": "PRO", "payment_method": "pm_card_visa"},
            headers=headers,
        )
        assert reply.status_code == 201, reply.text
        body = (await client.get("/api/usage", headers=headers)).json()
    assert body["source"] == "recorded"
    assert body["plan"] == "PRO" and body["limit"] == 5_000_000 and body["used"] == 0


async def test_stripe_down_is_503_and_the_event_is_not_remembered(
    billing_without_stripe: str, pg: AsyncEngine
) -> None:
    async with pg.begin() as conn:
        await conn.execute(insert(customers).values(user_id="deg-2", stripe_customer_id="cus_deg2"))
    async with httpx.AsyncClient(base_url=billing_without_stripe, timeout=30) as client:
        reply = await client.post(
            "/api/subscribe",
            json={"plan": "PLUS", "payment_method": "pm_card_visa"},
            headers=auth("deg-2"),
        )
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "payment_provider_unavailable"
        assert "Retry-After" in reply.headers
        obj = {"id": "sub_deg2", "object": "subscription", "customer": "cus_deg2"}
        reply = await send_event(client, "customer.subscription.updated", obj, "evt_deg2")
        assert reply.status_code == 503
    async with pg.connect() as conn:
        found = await conn.scalar(
            select(func.count())
            .select_from(stripe_events)
            .where(stripe_events.c.event_id == "evt_deg2")
        )
    assert found == 0


@pytest.fixture
async def stripe_blackhole() -> AsyncIterator[Blackhole]:
    hole = await Blackhole().start()
    yield hole
    await hole.stop()


async def test_a_hanging_stripe_holds_up_no_other_user(
    base_env: dict[str, str],
    logs_dir: Path,
    localstripe_url: str,
    keys: Keys,
    stripe_blackhole: Blackhole,
) -> None:
    """More subscribes waiting on Stripe than the billing API has Postgres connections (and a
    burst from one user queued behind its own): other users' reads and webhooks still answer
    at once, since no connection is held while Stripe is asked."""
    process, url = start_billing(
        base_env, logs_dir, localstripe_url, keys, STRIPE_API_BASE=stripe_blackhole.url
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"plan": "PLUS", "payment_method": "pm_card_visa"}
            users = [f"hang-{n}" for n in range(25)] + ["hang-burst"] * 5
            pending = [
                asyncio.create_task(client.post("/api/subscribe", json=body, headers=auth(user)))
                for user in users
            ]

            async def all_asking_stripe() -> bool:
                return stripe_blackhole.connections >= 25

            await eventually(all_asking_stripe, 10, "25 subscribes waiting on Stripe")
            started = time.monotonic()
            reply = await client.get("/api/subscription", headers=auth("hang-reader"))
            assert reply.status_code == 200
            reply = await client.get("/api/usage", headers=auth("hang-reader"))
            assert reply.status_code == 200
            obj = {"id": "cus_hang", "object": "customer"}
            reply = await send_event(client, "customer.created", obj, "evt_hang")
            assert reply.status_code == 200
            assert time.monotonic() - started < 1.0
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        process.kill()
