"""Failed payments: a first payment that fails leaves the user on FREE until one succeeds; a
renewal that fails keeps the paid plan while Stripe retries (past_due), and when Stripe gives
up and ends the subscription the user is back on FREE."""

from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import subscriptions
from tests.api import usage
from tests.billing.helpers import (
    auth,
    authenticate,
    bill_a_renewal,
    send_event,
    stripe_subscriptions,
    subscribe,
    three_d_secure_card,
)
from tests.servers import eventually


async def status_of(pg: AsyncEngine, subscription_id: str) -> str | None:
    async with pg.connect() as conn:
        found = await conn.scalar(
            select(subscriptions.c.status).where(
                subscriptions.c.stripe_subscription_id == subscription_id
            )
        )
    return str(found) if found else None


async def test_first_payment_declined_then_paid_with_another_card(
    billing: httpx.AsyncClient,
    http: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    pg: AsyncEngine,
) -> None:
    user = "pay-1"
    headers = auth(user)
    reply = await billing.post(
        "/api/subscribe",
        json={"plan": "PLUS", "payment_method": "pm_card_chargeCustomerFail"},
        headers=headers,
    )
    assert reply.status_code == 402, reply.text
    error = reply.json()["error"]
    assert error["code"] == "payment_failed" and error["subscription_status"] == "incomplete"
    failed_id = error["subscription_id"]

    reply = await billing.get("/api/subscription", headers=headers)
    assert reply.json()["subscription"]["plan"] == "FREE"
    assert (await usage(http, user))["limit"] == 100_000
    payments = (await billing.get("/api/payments", headers=headers)).json()["payments"]
    assert [p["status"] for p in payments] == ["failed"]

    # Stripe reports the failure by webhook too (localstripe does not): nothing changes.
    invoice = (await stripe_client.v1.subscriptions.retrieve_async(failed_id)).latest_invoice
    assert isinstance(invoice, str)
    failed_invoice = (await stripe_client.v1.invoices.retrieve_async(invoice)).to_dict()
    reply = await send_event(billing, "invoice.payment_failed", failed_invoice)
    assert reply.status_code == 200 and reply.json()["applied"] is True
    assert (await usage(http, user))["limit"] == 100_000

    reply = await billing.post(
        "/api/subscribe", json={"plan": "PLUS", "payment_method": "pm_card_visa"}, headers=headers
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["subscription"]["plan"] == "PLUS"
    assert (await usage(http, user))["limit"] == 1_000_000
    # The incomplete subscription was closed, not left to be paid by accident later.
    assert (await stripe_client.v1.subscriptions.retrieve_async(failed_id)).status == "canceled"
    assert await status_of(pg, failed_id) == "canceled"


async def test_subscribe_without_any_payment_method_is_402(billing: httpx.AsyncClient) -> None:
    headers = auth("pay-2")
    reply = await billing.post("/api/subscribe", json={"plan": "PLUS"}, headers=headers)
    assert reply.status_code == 402, reply.text
    assert reply.json()["error"]["code"] == "payment_failed"
    reply = await billing.post(
        "/api/subscribe",
        json={"plan": "PLUS", "payment_method": "pm_card_visa_chargeDeclined"},
        headers=headers,
    )
    assert reply.status_code == 402, reply.text
    reply = await billing.get("/api/subscription", headers=headers)
    assert reply.json()["subscription"]["plan"] == "FREE"


async def test_renewal_failure_keeps_the_plan_while_stripe_retries(
    billing: httpx.AsyncClient,
    http: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    pg: AsyncEngine,
) -> None:
    user = "pay-3"
    headers = auth(user)
    reply = await billing.post(
        "/api/subscribe", json={"plan": "PLUS", "payment_method": "pm_card_visa"}, headers=headers
    )
    assert reply.status_code == 201, reply.text
    subscription_id = reply.json()["subscription"]["id"]
    customer = (await stripe_client.v1.subscriptions.retrieve_async(subscription_id)).customer
    assert isinstance(customer, str)

    # The card on file starts failing, then a charge comes due.
    card = await stripe_client.v1.payment_methods.attach_async(
        "pm_card_chargeCustomerFail", {"customer": customer}
    )
    await stripe_client.v1.customers.update_async(
        customer, {"invoice_settings": {"default_payment_method": card.id}}
    )
    renewed = await bill_a_renewal(stripe_client, subscription_id)
    assert renewed.status == "past_due"
    assert isinstance(renewed.latest_invoice, str)
    invoice = (await stripe_client.v1.invoices.retrieve_async(renewed.latest_invoice)).to_dict()
    assert invoice["status"] == "open"

    # Stripe says the payment failed (localstripe does not send this one).
    reply = await send_event(billing, "invoice.payment_failed", invoice)
    assert reply.status_code == 200 and reply.json()["applied"] is True
    assert await status_of(pg, subscription_id) == "past_due"
    subscription = (await billing.get("/api/subscription", headers=headers)).json()
    assert subscription["subscription"]["status"] == "past_due"
    assert subscription["subscription"]["plan"] == "PLUS"
    assert (await usage(http, user))["limit"] == 1_000_000
    statuses = {
        p["id"]: p["status"]
        for p in (await billing.get("/api/payments", headers=headers)).json()["payments"]
    }
    assert statuses[invoice["id"]] == "failed"

    # Recovery: a working card, and Stripe's retry pays the invoice (localstripe sends
    # invoice.payment_succeeded itself).
    card = await stripe_client.v1.payment_methods.attach_async(
        "pm_card_visa", {"customer": customer}
    )
    await stripe_client.v1.customers.update_async(
        customer, {"invoice_settings": {"default_payment_method": card.id}}
    )
    await stripe_client.v1.invoices.pay_async(invoice["id"])

    async def paid_and_active() -> bool:
        listed = (await billing.get("/api/payments", headers=headers)).json()["payments"]
        statuses = {p["id"]: p["status"] for p in listed}
        return (
            statuses[invoice["id"]] == "succeeded"
            and await status_of(pg, subscription_id) == "active"
        )

    await eventually(paid_and_active, 10, "invoice.payment_succeeded of the retried payment")
    assert (await usage(http, user))["limit"] == 1_000_000

    # Had the retries all failed, Stripe would end the subscription: FREE at once.
    await stripe_client.v1.subscriptions.cancel_async(subscription_id)

    async def free() -> bool:
        return bool((await usage(http, user))["limit"] == 100_000)

    await eventually(free, 10, "customer.subscription.deleted")


async def payment_statuses(billing: httpx.AsyncClient, user: str) -> list[tuple[str, str]]:
    payments = (await billing.get("/api/payments", headers=auth(user))).json()["payments"]
    return [(p["status"], p["plan"]) for p in payments]


async def needs_3d_secure(
    billing: httpx.AsyncClient, stripe_client: stripe.StripeClient, user: str
) -> dict[str, Any]:
    """A PRO subscribe whose first payment waits for 3-D Secure; the 402's error."""
    card = await three_d_secure_card(stripe_client)
    reply = await billing.post(
        "/api/subscribe", json={"plan": "PRO", "payment_method": card}, headers=auth(user)
    )
    assert reply.status_code == 402, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == "payment_failed" and error["payment_status"] == "requires_action"
    return error


async def test_a_card_that_needs_3d_secure_can_subscribe_after_authenticating(
    billing: httpx.AsyncClient,
    http: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    localstripe_url: str,
) -> None:
    """The first payment needs the card holder (3-D Secure): 402 with what Stripe.js needs to
    finish it, the incomplete subscription kept, the payment pending (whatever invoice events
    come meanwhile), FREE until Stripe reports the payment."""
    user = "pay-3ds"
    headers = auth(user)
    error = await needs_3d_secure(billing, stripe_client, user)
    assert error["subscription_status"] == "incomplete"
    client_secret = error["client_secret"]
    assert client_secret.startswith("pi_") and "_secret_" in client_secret
    assert (await usage(http, user))["limit"] == 100_000
    assert await payment_statuses(billing, user) == [("pending", "PRO")]

    # Stripe's events about the invoice while the card holder authenticates (localstripe sends
    # neither) re-read it: still pending, not failed.
    invoice_id = (
        await stripe_client.v1.subscriptions.retrieve_async(error["subscription_id"])
    ).latest_invoice
    assert isinstance(invoice_id, str)
    invoice = (await stripe_client.v1.invoices.retrieve_async(invoice_id)).to_dict()
    for kind in ("invoice.finalized", "invoice.payment_action_required"):
        reply = await send_event(billing, kind, invoice)
        assert reply.status_code == 200 and reply.json()["applied"] is True, reply.text
        assert await payment_statuses(billing, user) == [("pending", "PRO")], kind

    await authenticate(localstripe_url, client_secret)

    async def paid() -> bool:
        return await payment_statuses(billing, user) == [("succeeded", "PRO")]

    await eventually(paid, 10, "invoice.payment_succeeded after authentication")
    reply = await billing.get("/api/subscription", headers=headers)
    subscription = reply.json()["subscription"]
    assert subscription["plan"] == "PRO" and subscription["id"] == error["subscription_id"]
    assert (await usage(http, user))["limit"] == 5_000_000


async def stripe_statuses(
    pg: AsyncEngine, stripe_client: stripe.StripeClient, user: str
) -> list[tuple[str, str]]:
    return [(s["id"], s["status"]) for s in await stripe_subscriptions(pg, stripe_client, user)]


async def test_subscribing_again_after_3d_secure_keeps_the_paid_subscription(
    billing: httpx.AsyncClient,
    http: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    pg: AsyncEngine,
    localstripe_url: str,
    no_webhooks: None,
) -> None:
    """The card holder completes 3-D Secure; before Stripe's event arrives the user, still
    shown FREE, presses subscribe again: the paid subscription is found in Stripe, recorded,
    and the retry refused, not the paid one cancelled and a second one bought."""
    user = "pay-3ds-again"
    error = await needs_3d_secure(billing, stripe_client, user)
    await authenticate(localstripe_url, error["client_secret"])
    view = (await billing.get("/api/subscription", headers=auth(user))).json()["subscription"]
    assert view["plan"] == "FREE"

    reply = await billing.post(
        "/api/subscribe", json={"plan": "PRO", "payment_method": "pm_card_visa"}, headers=auth(user)
    )
    assert reply.status_code == 409, reply.text
    refusal = reply.json()["error"]
    assert refusal["subscription_id"] == error["subscription_id"] and refusal["plan"] == "PRO"
    assert await stripe_statuses(pg, stripe_client, user) == [(error["subscription_id"], "active")]
    assert await payment_statuses(billing, user) == [("succeeded", "PRO")]
    assert (await usage(http, user))["limit"] == 5_000_000


@pytest.mark.parametrize("dormant", ["unpaid", "paused"])
async def test_a_dormant_subscription_that_came_back_blocks_a_new_one(
    billing: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    pg: AsyncEngine,
    dormant: str,
    no_webhooks: None,
) -> None:
    """A subscription recorded unpaid or paused gives FREE, but can become paid again (its
    invoice paid, or resumed). Stripe holds it active again and its event is still on the way:
    subscribe finds it in Stripe and refuses, rather than buy a second one beside it.
    (localstripe cannot make a subscription unpaid or paused; the row stands for Stripe's
    earlier event that said so.)"""
    user = f"pay-{dormant}"
    subscription_id = await subscribe(billing, user)
    async with pg.begin() as conn:
        await conn.execute(
            update(subscriptions)
            .where(subscriptions.c.stripe_subscription_id == subscription_id)
            .values(status=dormant)
        )
    assert (await billing.get("/api/subscription", headers=auth(user))).json()["subscription"][
        "plan"
    ] == "FREE"

    reply = await billing.post(
        "/api/subscribe", json={"plan": "PRO", "payment_method": "pm_card_visa"}, headers=auth(user)
    )
    assert reply.status_code == 409, reply.text
    assert reply.json()["error"]["subscription_id"] == subscription_id
    assert await status_of(pg, subscription_id) == "active"
    assert await stripe_statuses(pg, stripe_client, user) == [(subscription_id, "active")]
