"""When Redis or Stripe is down: Redis down only delays the push (Postgres keeps the record and
usage falls back to it); Stripe down is a 503 to retry, and a webhook that could not be
applied is not remembered, so Stripe's retry applies it; Stripe hanging holds up nobody but
the users waiting for it, and a Stripe call ends at its cap however Stripe answers."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import stripe
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_api import stripe_api
from quota_common.schema import customers, stripe_events
from quota_common.settings import Settings
from tests.billing.faults import Blackhole, Trickle
from tests.billing.helpers import Keys, auth, metric, send_event, start_billing
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
    """More subscribes waiting on Stripe than the billing API has Postgres connections, and a
    burst from one user queued behind its own first request: other users' reads and webhooks
    are answered while every subscribe still waits, since no connection is held while Stripe
    is asked, and the queued requests of the burst never ask Stripe at all."""
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
            in_progress = 'quota_billing_http_requests_in_progress{route="subscribe"}'

            async def all_in() -> bool:
                return (
                    stripe_blackhole.connections >= 26 and await metric(client, in_progress) == 30
                )

            await eventually(all_in, 10, "26 subscribes asking Stripe, 4 queued behind one")
            started = time.monotonic()
            reply = await client.get("/api/subscription", headers=auth("hang-reader"))
            assert reply.status_code == 200
            reply = await client.get("/api/usage", headers=auth("hang-reader"))
            assert reply.status_code == 200
            obj = {"id": "cus_hang", "object": "customer"}
            reply = await send_event(client, "customer.created", obj, "evt_hang")
            assert reply.status_code == 200
            # Each subscribe ends only when its Stripe call gives up (20 s): none has yet.
            assert not any(task.done() for task in pending[:25])
            assert time.monotonic() - started < 5
            # 25 users and the burst's first request: the burst's other four wait their turn.
            assert stripe_blackhole.connections == 26
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        process.kill()


async def test_a_stripe_call_ends_at_its_cap_however_slowly_stripe_answers() -> None:
    """A server that trickles its answer never trips httpx's per-read timeout; the cap on the
    whole call still ends it, as a connection error (the billing API's 503)."""
    trickle = await Trickle().start()
    try:
        settings = Settings(stripe_api_key="sk_test_cap", stripe_api_base=trickle.url)
        api = stripe_api.client(settings, call_s=0.5)
        started = time.monotonic()
        async with asyncio.timeout(10):
            with pytest.raises(stripe.APIConnectionError, match="did not answer within"):
                await stripe_api.retrieve_subscription(api, "sub_cap")
        assert time.monotonic() - started >= 0.5
    finally:
        await trickle.stop()
