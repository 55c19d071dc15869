"""When Redis or Stripe is down: Redis down only delays the push (Postgres keeps the record and
usage falls back to it); Stripe down is a 503 to retry, and a webhook that could not be
applied is not remembered, so Stripe's retry applies it."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import customers, stripe_events
from tests.billing.helpers import Keys, auth, send_event, start_billing
from tests.servers import free_port


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
