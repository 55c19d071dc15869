"""Stripe's answer lost on the way back (Stripe did the work, the billing API never heard), or
the request lost on the way there, with a real TCP proxy between a billing API process and
localstripe: a retry never buys a second subscription, whatever it asks for, and the
subscription Stripe made is recorded by the retry or by its own webhook."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import stripe
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import customers, subscribe_attempts, subscriptions
from tests.api import usage
from tests.billing.faults import LossyProxy
from tests.billing.helpers import Keys, auth, silence_webhooks, start_billing, subscribe
from tests.servers import eventually

SUBSCRIPTION_CREATE = b"POST /v1/subscriptions "
VISA = {"plan": "PLUS", "payment_method": "pm_card_visa"}


@dataclass(frozen=True)
class Lossy:
    """A billing API process whose Stripe calls go through `proxy`."""

    proxy: LossyProxy
    client: httpx.AsyncClient


@pytest.fixture(scope="module")
async def lossy(
    base_env: dict[str, str], logs_dir: Path, localstripe_url: str, keys: Keys
) -> AsyncIterator[Lossy]:
    proxy = LossyProxy(int(urlsplit(localstripe_url).port or 0))
    port = await proxy.start()
    process, url = start_billing(
        base_env, logs_dir, localstripe_url, keys, STRIPE_API_BASE=f"http://127.0.0.1:{port}"
    )
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield Lossy(proxy, client)
    process.stop()
    await proxy.stop()


async def stripe_subscriptions(
    pg: AsyncEngine, stripe_client: stripe.StripeClient, user_id: str
) -> list[dict[str, Any]]:
    async with pg.connect() as conn:
        customer = await conn.scalar(
            select(customers.c.stripe_customer_id).where(customers.c.user_id == user_id)
        )
    listed = await stripe_client.v1.subscriptions.list_async(
        {"customer": str(customer), "status": "all"}
    )
    return [s.to_dict() for s in listed.data]


async def attempts(pg: AsyncEngine, user_id: str) -> list[tuple[str | None, bool]]:
    """(subscription id, finished) of each of the user's subscribe attempts, oldest first."""
    async with pg.connect() as conn:
        rows = await conn.execute(
            select(subscribe_attempts.c.stripe_subscription_id, subscribe_attempts.c.finished_at)
            .where(subscribe_attempts.c.user_id == user_id)
            .order_by(subscribe_attempts.c.id)
        )
        return [(row.stripe_subscription_id, row.finished_at is not None) for row in rows]


async def lost_subscribe(lossy: Lossy, user_id: str) -> None:
    lossy.proxy.lose("answer", SUBSCRIPTION_CREATE)
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user_id))
    assert lossy.proxy.lost.is_set()
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "payment_provider_unavailable"


async def test_a_retry_after_a_lost_answer_buys_nothing_more(
    lossy: Lossy,
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    stripe_client: stripe.StripeClient,
    localstripe_url: str,
    billing_url: str,
) -> None:
    # No webhook: the retry alone must find what Stripe made.
    silence_webhooks(localstripe_url, billing_url)
    user = "lost-1"
    await lost_subscribe(lossy, user)
    made = await stripe_subscriptions(pg, stripe_client, user)
    assert [s["status"] for s in made] == ["active"]
    assert await attempts(pg, user) == [(None, False)]

    # The retries a client may make: without the card (it is saved now), or another plan.
    for body in ({"plan": "PLUS"}, {"plan": "PRO", "payment_method": "pm_card_visa"}, VISA):
        reply = await lossy.client.post("/api/subscribe", json=body, headers=auth(user))
        assert reply.status_code == 409, reply.text
        error = reply.json()["error"]
        assert error["code"] == "conflict" and error["subscription_id"] == made[0]["id"]
        assert error["plan"] == "PLUS"

    assert [s["id"] for s in await stripe_subscriptions(pg, stripe_client, user)] == [made[0]["id"]]
    assert await attempts(pg, user) == [(made[0]["id"], True)]
    view = (await lossy.client.get("/api/subscription", headers=auth(user))).json()
    assert view["subscription"]["id"] == made[0]["id"] and view["subscription"]["plan"] == "PLUS"
    assert (await usage(http, user))["limit"] == 1_000_000
    payments = (await lossy.client.get("/api/payments", headers=auth(user))).json()["payments"]
    assert [(p["status"], p["plan"]) for p in payments] == [("succeeded", "PLUS")]


async def test_the_webhook_records_a_subscription_whose_answer_was_lost(
    lossy: Lossy, http: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    user = "lost-2"
    await lost_subscribe(lossy, user)

    async def recorded() -> bool:
        reply = await lossy.client.get("/api/subscription", headers=auth(user))
        return bool(reply.json()["subscription"]["plan"] == "PLUS")

    await eventually(recorded, 10, "customer.subscription.created of the lost subscribe")
    [(subscription_id, finished)] = await attempts(pg, user)
    assert subscription_id is not None and finished
    assert (await usage(http, user))["limit"] == 1_000_000


async def test_a_request_stripe_never_saw_is_settled_then_retried(
    lossy: Lossy, pg: AsyncEngine, stripe_client: stripe.StripeClient
) -> None:
    user = "lost-3"
    lossy.proxy.lose("request", SUBSCRIPTION_CREATE)
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 503, reply.text
    assert await stripe_subscriptions(pg, stripe_client, user) == []

    # Stripe may still be working on a call that timed out: too early to say it made nothing.
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 409 and "Retry-After" in reply.headers, reply.text
    assert await stripe_subscriptions(pg, stripe_client, user) == []

    async with pg.begin() as conn:
        await conn.execute(
            update(subscribe_attempts)
            .where(subscribe_attempts.c.user_id == user)
            .values(created_at=text("now() - interval '3 minutes'"))
        )
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 201, reply.text
    made = await stripe_subscriptions(pg, stripe_client, user)
    assert [s["id"] for s in made] == [reply.json()["subscription"]["id"]]
    assert await attempts(pg, user) == [(None, True), (made[0]["id"], True)]


async def test_a_retried_cancel_after_a_lost_answer_ends_the_plan(
    lossy: Lossy,
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    localstripe_url: str,
    billing_url: str,
) -> None:
    silence_webhooks(localstripe_url, billing_url)
    user = "lost-4"
    subscription_id = await subscribe(lossy.client, user)

    lossy.proxy.lose("answer", f"DELETE /v1/subscriptions/{subscription_id} ".encode())
    cancel = {"at_period_end": False}
    reply = await lossy.client.post("/api/cancel", json=cancel, headers=auth(user))
    assert reply.status_code == 503 and lossy.proxy.lost.is_set(), reply.text

    reply = await lossy.client.post("/api/cancel", json=cancel, headers=auth(user))
    assert reply.status_code == 200, reply.text
    assert reply.json()["subscription"]["plan"] == "FREE"
    async with pg.connect() as conn:
        status = await conn.scalar(
            select(subscriptions.c.status).where(
                subscriptions.c.stripe_subscription_id == subscription_id
            )
        )
    assert status == "canceled"
    assert (await usage(http, user))["limit"] == 100_000


async def test_concurrent_subscribes_through_two_processes_buy_one_subscription(
    lossy: Lossy,
    billing: httpx.AsyncClient,
    pg: AsyncEngine,
    stripe_client: stripe.StripeClient,
) -> None:
    user = "lost-5"
    replies = await asyncio.gather(
        *(
            client.post("/api/subscribe", json=VISA, headers=auth(user))
            for client in (lossy.client, billing) * 3
        )
    )
    assert sorted(r.status_code for r in replies) == [201, 409, 409, 409, 409, 409]
    assert len(await stripe_subscriptions(pg, stripe_client, user)) == 1
