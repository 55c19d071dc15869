"""A user's whole billing life against localstripe, with the sidecar enforcing the quota:
FREE, subscribe PLUS, upgrade PRO, cancel at period end, Stripe ends it, FREE again."""

import asyncio

import httpx
import psycopg
import stripe
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.accounts import PLAN_CHANNEL
from quota_common.schema import customers, stripe_events
from tests.api import reserve, usage
from tests.billing.helpers import auth, subscribe
from tests.servers import eventually


async def sidecar_limit(http: httpx.AsyncClient, user_id: str, limit: int) -> float:
    async def reached() -> bool:
        return bool((await usage(http, user_id))["limit"] == limit)

    return await eventually(reached, 1.0, f"sidecar limit {limit} for {user_id}")


async def test_quota_follows_the_subscription_through_its_life(
    billing: httpx.AsyncClient,
    http: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    pg: AsyncEngine,
) -> None:
    user = "life-1"
    headers = auth(user)

    status, hold = await reserve(http, user, 1000)
    assert status == 200 and hold["plan"] == "FREE" and hold["limit"] == 100_000

    reply = await billing.get("/api/subscription", headers=headers)
    assert reply.status_code == 200
    assert reply.json()["subscription"]["plan"] == "FREE"

    reply = await billing.post(
        "/api/subscribe", json={"plan": "PLUS", "payment_method": "pm_card_visa"}, headers=headers
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["ok"] is True
    subscription = body["subscription"]
    assert subscription["plan"] == "PLUS" and subscription["status"] == "active"
    assert subscription["id"].startswith("sub_")
    await sidecar_limit(http, user, 1_000_000)

    reply = await billing.post("/api/subscribe", json={"plan": "PRO"}, headers=headers)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "conflict"

    reply = await billing.post("/api/change-plan", json={"plan": "PRO"}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["subscription"]["plan"] == "PRO"
    await sidecar_limit(http, user, 5_000_000)
    in_stripe = await stripe_client.v1.subscriptions.retrieve_async(subscription["id"])
    assert in_stripe["items"].data[0].plan.metadata["quota_plan"] == "PRO"

    reply = await billing.post("/api/change-plan", json={"plan": "PLUS"}, headers=headers)
    assert reply.status_code == 200 and reply.json()["subscription"]["plan"] == "PLUS"
    await sidecar_limit(http, user, 1_000_000)

    reply = await billing.post("/api/cancel", json={"at_period_end": True}, headers=headers)
    assert reply.status_code == 200, reply.text
    cancelled = reply.json()["subscription"]
    assert cancelled["plan"] == "PLUS" and cancelled["cancel_at_period_end"] is True
    assert (await usage(http, user))["limit"] == 1_000_000

    # The period ends: Stripe deletes the subscription and says so by webhook.
    await stripe_client.v1.subscriptions.cancel_async(subscription["id"])

    async def free_again() -> bool:
        reply = await billing.get("/api/subscription", headers=headers)
        return bool(reply.json()["subscription"]["plan"] == "FREE")

    await eventually(free_again, 10, "the deletion webhook")
    await sidecar_limit(http, user, 100_000)

    async def deletion_recorded() -> bool:
        async with pg.connect() as conn:
            types = set(await conn.scalars(select(stripe_events.c.type)))
        return "customer.subscription.deleted" in types

    # Any event about the subscription may have brought the news first (each re-reads Stripe).
    await eventually(deletion_recorded, 10, "the deletion event")

    payments = (await billing.get("/api/payments", headers=headers)).json()["payments"]
    assert payments and payments[-1]["status"] == "succeeded"
    assert payments[-1]["amount"] == 990 and payments[-1]["currency"] == "usd"
    assert payments[-1]["plan"] == "PLUS"


async def test_one_stripe_customer_per_user_across_subscriptions(
    billing: httpx.AsyncClient, pg: AsyncEngine, stripe_client: stripe.StripeClient
) -> None:
    headers = auth("life-2")
    body = {"plan": "PLUS", "payment_method": "pm_card_visa"}
    reply = await billing.post("/api/subscribe", json=body, headers=headers)
    assert reply.status_code == 201, reply.text
    first = reply.json()["subscription"]["id"]

    reply = await billing.post("/api/cancel", json={"at_period_end": False}, headers=headers)
    assert reply.status_code == 200 and reply.json()["subscription"]["plan"] == "FREE"
    assert (await stripe_client.v1.subscriptions.retrieve_async(first)).status == "canceled"

    reply = await billing.post("/api/subscribe", json={"plan": "PRO"}, headers=headers)
    assert reply.status_code == 201, reply.text
    assert reply.json()["subscription"]["plan"] == "PRO"
    assert reply.json()["subscription"]["id"] != first

    async with pg.connect() as conn:
        rows = (
            await conn.execute(
                select(customers.c.stripe_customer_id).where(customers.c.user_id == "life-2")
            )
        ).all()
    assert len(rows) == 1
    customer_id = rows[0].stripe_customer_id
    listed = await stripe_client.v1.subscriptions.list_async(
        {"customer": str(customer_id), "status": "all"}
    )
    assert len(listed.data) == 2


async def test_concurrent_subscribes_buy_one_subscription(
    billing: httpx.AsyncClient, stripe_client: stripe.StripeClient, pg: AsyncEngine
) -> None:
    headers = auth("life-3")
    body = {"plan": "PLUS", "payment_method": "pm_card_visa"}
    replies = await asyncio.gather(
        *(billing.post("/api/subscribe", json=body, headers=headers) for _ in range(5))
    )
    assert sorted(r.status_code for r in replies) == [201, 409, 409, 409, 409]
    async with pg.connect() as conn:
        customer_id = await conn.scalar(
            select(customers.c.stripe_customer_id).where(customers.c.user_id == "life-3")
        )
    listed = await stripe_client.v1.subscriptions.list_async(
        {"customer": str(customer_id), "status": "all"}
    )
    assert len(listed.data) == 1


async def test_each_change_notifies_the_sync_worker(
    billing: httpx.AsyncClient, database_url: str
) -> None:
    headers = auth("life-4")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute(f"LISTEN {PLAN_CHANNEL}")
        reply = await billing.post(
            "/api/subscribe",
            json={"plan": "PLUS", "payment_method": "pm_card_visa"},
            headers=headers,
        )
        assert reply.status_code == 201, reply.text
        reply = await billing.post("/api/change-plan", json={"plan": "PRO"}, headers=headers)
        assert reply.status_code == 200, reply.text
        payloads = [n.payload async for n in listener.notifies(timeout=5, stop_after=2)]
    assert payloads == ["life-4", "life-4"]


async def test_a_scheduled_cancellation_is_undone_by_choosing_a_plan(
    billing: httpx.AsyncClient, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    user = "life-5"
    headers = auth(user)
    subscription_id = await subscribe(billing, user)

    async def scheduled(expected: bool) -> None:
        reply = await billing.get("/api/subscription", headers=headers)
        assert reply.json()["subscription"]["cancel_at_period_end"] is expected
        in_stripe = await stripe_client.v1.subscriptions.retrieve_async(subscription_id)
        assert in_stripe.cancel_at_period_end is expected

    reply = await billing.post("/api/cancel", json={"at_period_end": True}, headers=headers)
    assert reply.status_code == 200, reply.text
    await scheduled(True)
    # Subscribing again is refused, and says how to keep the subscription.
    reply = await billing.post("/api/subscribe", json={"plan": "PLUS"}, headers=headers)
    assert reply.status_code == 409 and "/api/change-plan" in reply.json()["error"]["message"]

    # The current plan again keeps it.
    reply = await billing.post("/api/change-plan", json={"plan": "PLUS"}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["subscription"]["cancel_at_period_end"] is False
    await scheduled(False)

    # An upgrade after a scheduled cancellation keeps the upgraded subscription too.
    reply = await billing.post("/api/cancel", json={"at_period_end": True}, headers=headers)
    assert reply.status_code == 200, reply.text
    reply = await billing.post("/api/change-plan", json={"plan": "PRO"}, headers=headers)
    assert reply.status_code == 200, reply.text
    view = reply.json()["subscription"]
    assert view["plan"] == "PRO" and view["cancel_at_period_end"] is False
    await scheduled(False)
    await sidecar_limit(http, user, 5_000_000)
