"""Stripe's answer lost on the way back (Stripe did the work, the billing API never heard), the
request lost on the way there, or held up in between, with a real TCP proxy between a billing
API process and localstripe: a retry never buys a second subscription, whatever it asks for,
and the subscription Stripe made is recorded by the retry or by its own webhook; a process that
outlived its lease records nothing; a 3-D Secure payment completed while a new subscribe ends
the old subscription keeps it."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import stripe
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import billing_leases, subscribe_attempts, subscriptions
from tests.api import usage
from tests.billing.faults import LossyProxy
from tests.billing.helpers import (
    Keys,
    auth,
    authenticate,
    metric,
    send_event,
    start_billing,
    stripe_subscriptions,
    subscribe,
    three_d_secure_card,
)
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


async def attempts(pg: AsyncEngine, user_id: str) -> list[tuple[str | None, bool]]:
    """(subscription id, finished) of each of the user's subscribe attempts, oldest first."""
    async with pg.connect() as conn:
        rows = await conn.execute(
            select(subscribe_attempts.c.stripe_subscription_id, subscribe_attempts.c.finished_at)
            .where(subscribe_attempts.c.user_id == user_id)
            .order_by(subscribe_attempts.c.id)
        )
        return [(row.stripe_subscription_id, row.finished_at is not None) for row in rows]


async def age_attempt(pg: AsyncEngine, user_id: str, age: str) -> None:
    """As if the user's open subscribe attempt had started `age` ago."""
    async with pg.begin() as conn:
        await conn.execute(
            update(subscribe_attempts)
            .where(
                subscribe_attempts.c.user_id == user_id, subscribe_attempts.c.finished_at.is_(None)
            )
            .values(created_at=text(f"now() - interval '{age}'"))
        )


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
    no_webhooks: None,
) -> None:
    # No webhook: the retry alone must find what Stripe made.
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
    # Not 409 (that says "already subscribed"): 503, to come back when it can be told.
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "service_unavailable"
    assert 100 <= int(reply.headers["Retry-After"]) <= 120
    assert await stripe_subscriptions(pg, stripe_client, user) == []

    await age_attempt(pg, user, "100 seconds")
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 503, reply.text
    assert 1 <= int(reply.headers["Retry-After"]) <= 20, "the time left, not a fixed guess"

    await age_attempt(pg, user, "3 minutes")
    reply = await lossy.client.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 201, reply.text
    made = await stripe_subscriptions(pg, stripe_client, user)
    assert [s["id"] for s in made] == [reply.json()["subscription"]["id"]]
    assert await attempts(pg, user) == [(None, True), (made[0]["id"], True)]


async def test_a_retried_cancel_after_a_lost_answer_ends_the_plan(
    lossy: Lossy,
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    no_webhooks: None,
) -> None:
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


async def test_a_create_held_up_past_its_lease_records_nothing_and_buys_one_subscription(
    lossy: Lossy,
    billing: httpx.AsyncClient,
    pg: AsyncEngine,
    stripe_client: stripe.StripeClient,
    no_webhooks: None,
) -> None:
    """A process whose subscription create is held up past its lease (a stalled process): a
    second process takes the lease over, yet does not take the attempt for abandoned while
    its create may still reach Stripe; the first one's answer is then fenced off, and Stripe
    holds one subscription, which the retry records."""
    user = "lost-6"
    lossy.proxy.delay(SUBSCRIPTION_CREATE)
    first = asyncio.create_task(lossy.client.post("/api/subscribe", json=VISA, headers=auth(user)))
    await asyncio.wait_for(lossy.proxy.held.wait(), 10)
    async with pg.begin() as conn:
        await conn.execute(
            update(billing_leases)
            .where(billing_leases.c.user_id == user)
            .values(expires_at=text("now() - interval '1 second'"))
        )

    reply = await billing.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 503, reply.text
    assert 100 <= int(reply.headers["Retry-After"]) <= 120
    assert await attempts(pg, user) == [(None, False)]

    lossy.proxy.release()
    late = await first
    assert late.status_code == 503, late.text
    assert "not recorded" in late.json()["error"]["message"]
    made = await stripe_subscriptions(pg, stripe_client, user)
    assert [s["status"] for s in made] == ["active"]
    view = (await billing.get("/api/subscription", headers=auth(user))).json()["subscription"]
    assert view["plan"] == "FREE", "the fenced-off answer wrote nothing"

    reply = await billing.post("/api/subscribe", json=VISA, headers=auth(user))
    assert reply.status_code == 409 and reply.json()["error"]["subscription_id"] == made[0]["id"]
    assert await attempts(pg, user) == [(made[0]["id"], True)]
    assert len(await stripe_subscriptions(pg, stripe_client, user)) == 1


async def test_a_subscription_of_an_attempt_closed_as_abandoned_is_flagged(
    lossy: Lossy,
    pg: AsyncEngine,
    stripe_client: stripe.StripeClient,
    no_webhooks: None,
) -> None:
    """Stripe made the subscription of an attempt already closed as "Stripe made none" (which
    ATTEMPT_SETTLE is there to prevent): recorded, and flagged once for an operator."""
    user = "lost-7"
    await lost_subscribe(lossy, user)
    async with pg.begin() as conn:
        await conn.execute(
            update(subscribe_attempts)
            .where(subscribe_attempts.c.user_id == user)
            .values(finished_at=text("now()"))
        )
    sample = 'quota_billing_subscribe_recoveries_total{outcome="found_after_abandoned"}'
    before = await metric(lossy.client, sample)
    [made] = await stripe_subscriptions(pg, stripe_client, user)
    for _ in range(2):
        reply = await send_event(lossy.client, "customer.subscription.created", made)
        assert reply.status_code == 200 and reply.json()["applied"] is True, reply.text
    assert await metric(lossy.client, sample) == before + 1
    assert await attempts(pg, user) == [(made["id"], True)]
    view = (await lossy.client.get("/api/subscription", headers=auth(user))).json()
    assert view["subscription"]["id"] == made["id"]


async def test_3d_secure_completed_while_a_new_subscribe_ends_the_old_one_keeps_it(
    lossy: Lossy,
    pg: AsyncEngine,
    stripe_client: stripe.StripeClient,
    localstripe_url: str,
    no_webhooks: None,
) -> None:
    """The user subscribes again while the first subscription waits for 3-D Secure, and the
    card holder completes it at that very moment: the old subscription's invoice is voided
    before it is cancelled, Stripe refuses the void of the invoice just paid, and the paid
    subscription is kept and the new subscribe refused."""
    user = "lost-3ds"
    card = await three_d_secure_card(stripe_client)
    reply = await lossy.client.post(
        "/api/subscribe", json={"plan": "PRO", "payment_method": card}, headers=auth(user)
    )
    assert reply.status_code == 402, reply.text
    error = reply.json()["error"]
    first = await stripe_client.v1.subscriptions.retrieve_async(error["subscription_id"])
    lossy.proxy.delay(f"POST /v1/invoices/{first.latest_invoice}/void ".encode())
    again = asyncio.create_task(
        lossy.client.post(
            "/api/subscribe",
            json={"plan": "PRO", "payment_method": "pm_card_visa"},
            headers=auth(user),
        )
    )
    await asyncio.wait_for(lossy.proxy.held.wait(), 10)
    await authenticate(localstripe_url, error["client_secret"])
    lossy.proxy.release()

    reply = await again
    assert reply.status_code == 409, reply.text
    assert reply.json()["error"]["subscription_id"] == first.id
    made = await stripe_subscriptions(pg, stripe_client, user)
    assert [(s["id"], s["status"]) for s in made] == [(first.id, "active")]
    payments = (await lossy.client.get("/api/payments", headers=auth(user))).json()["payments"]
    assert [(p["status"], p["plan"]) for p in payments] == [("succeeded", "PRO")]
