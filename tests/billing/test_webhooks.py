"""Stripe webhooks: forged and stale signatures refused, a replayed event applied once, events
out of order leaving what Stripe holds last, and changes made in Stripe itself picked up."""

import json
import time
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.schema import stripe_events, subscriptions
from tests.api import usage
from tests.billing.helpers import auth, bill_a_renewal, send_event, sign, subscribe


async def subscribed(
    billing: httpx.AsyncClient, stripe_client: stripe.StripeClient, user: str, plan: str
) -> dict[str, Any]:
    subscription_id = await subscribe(billing, user, plan)
    return (await stripe_client.v1.subscriptions.retrieve_async(subscription_id)).to_dict()


async def stored(pg: AsyncEngine, *event_ids: str) -> int:
    """How many of these events are recorded (localstripe's late events from earlier tests may
    land in the table too, so the tests count their own)."""
    async with pg.connect() as conn:
        found = await conn.scalar(
            select(func.count())
            .select_from(stripe_events)
            .where(stripe_events.c.event_id.in_(event_ids))
        )
    return int(found or 0)


async def test_forged_stale_and_missing_signatures_are_400(
    billing: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    obj = {"id": "sub_forged", "object": "subscription", "customer": "cus_x"}
    forged = await send_event(
        billing, "customer.subscription.deleted", obj, "evt_forged", secret="whsec_wrong"
    )
    stale = await send_event(
        billing, "customer.subscription.deleted", obj, "evt_stale", timestamp=int(time.time()) - 301
    )
    for reply in (forged, stale):
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "bad_signature"

    payload = json.dumps({"id": "evt_1", "type": "x", "data": {"object": obj}})
    missing = await billing.post(
        "/api/webhooks/stripe", content=payload, headers={"Content-Type": "application/json"}
    )
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "bad_signature"
    tampered = await billing.post(
        "/api/webhooks/stripe",
        content=payload.replace("evt_1", "evt_2"),
        headers={"Stripe-Signature": sign(payload)},
    )
    assert tampered.status_code == 400
    garbage = "not json at all"
    not_json = await billing.post(
        "/api/webhooks/stripe", content=garbage, headers={"Stripe-Signature": sign(garbage)}
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    shapeless = json.dumps({"id": "evt_3", "type": "customer.subscription.updated"})
    no_object = await billing.post(
        "/api/webhooks/stripe", content=shapeless, headers={"Stripe-Signature": sign(shapeless)}
    )
    assert no_object.status_code == 422
    assert await stored(pg, "evt_forged", "evt_stale", "evt_1", "evt_2", "evt_3") == 0


async def test_a_replayed_event_is_applied_once(
    billing: httpx.AsyncClient, stripe_client: stripe.StripeClient, pg: AsyncEngine
) -> None:
    subscription = await subscribed(billing, stripe_client, "hook-1", "PLUS")
    first = await send_event(
        billing, "customer.subscription.updated", subscription, event_id="evt_replayed_1"
    )
    assert first.status_code == 200 and first.json()["applied"] is True
    second = await send_event(
        billing, "customer.subscription.updated", subscription, event_id="evt_replayed_1"
    )
    assert second.status_code == 200
    assert second.json()["applied"] is False and second.json()["replayed"] is True
    assert await stored(pg, "evt_replayed_1") == 1


async def test_events_out_of_order_leave_the_state_stripe_holds_last(
    billing: httpx.AsyncClient,
    http: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    pg: AsyncEngine,
) -> None:
    user = "hook-2"
    as_plus = await subscribed(billing, stripe_client, user, "PLUS")
    reply = await billing.post("/api/change-plan", json={"plan": "PRO"}, headers=auth(user))
    assert reply.status_code == 200, reply.text
    as_pro = (await stripe_client.v1.subscriptions.retrieve_async(as_plus["id"])).to_dict()
    now = int(time.time())

    # The newer event arrives first, then the older one still showing PLUS.
    newer = await send_event(billing, "customer.subscription.updated", as_pro, created=now)
    older = await send_event(billing, "customer.subscription.updated", as_plus, created=now - 60)
    assert newer.status_code == older.status_code == 200

    reply = await billing.get("/api/subscription", headers=auth(user))
    assert reply.json()["subscription"]["plan"] == "PRO"
    assert (await usage(http, user))["limit"] == 5_000_000

    # A "created" event long after the deletion does not bring the subscription back.
    await stripe_client.v1.subscriptions.cancel_async(as_plus["id"])
    deleted = (await stripe_client.v1.subscriptions.retrieve_async(as_plus["id"])).to_dict()
    await send_event(billing, "customer.subscription.deleted", deleted, created=now + 1)
    await send_event(billing, "customer.subscription.created", as_plus, created=now - 120)
    async with pg.connect() as conn:
        status = await conn.scalar(
            select(subscriptions.c.status).where(
                subscriptions.c.stripe_subscription_id == as_plus["id"]
            )
        )
    assert status == "canceled"
    assert (await usage(http, user))["limit"] == 100_000


async def test_a_change_made_in_stripe_is_picked_up_from_its_event(
    billing: httpx.AsyncClient, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    user = "hook-3"
    subscription = await subscribed(billing, stripe_client, user, "PRO")
    # An operator schedules the cancellation in Stripe's dashboard; localstripe sends no event
    # for it, Stripe sends customer.subscription.updated.
    changed = await stripe_client.v1.subscriptions.update_async(
        subscription["id"], {"cancel_at_period_end": True}
    )
    reply = await send_event(billing, "customer.subscription.updated", changed.to_dict())
    assert reply.status_code == 200 and reply.json()["applied"] is True
    view = (await billing.get("/api/subscription", headers=auth(user))).json()["subscription"]
    assert view["plan"] == "PRO" and view["cancel_at_period_end"] is True
    assert (await usage(http, user))["limit"] == 5_000_000


async def test_events_of_unknown_customers_and_types_are_acknowledged(
    billing: httpx.AsyncClient, pg: AsyncEngine
) -> None:
    unknown = {"id": "sub_nobody", "object": "subscription", "customer": "cus_nobody"}
    reply = await send_event(billing, "customer.subscription.updated", unknown, "evt_unknown")
    assert reply.status_code == 200 and reply.json()["applied"] is False
    other = {"id": "cus_someone", "object": "customer"}
    reply = await send_event(billing, "customer.created", other, "evt_other")
    assert reply.status_code == 200 and reply.json()["applied"] is False
    assert await stored(pg, "evt_unknown", "evt_other") == 2
    async with pg.connect() as conn:
        found = await conn.scalar(
            select(func.count())
            .select_from(subscriptions)
            .where(subscriptions.c.stripe_subscription_id == "sub_nobody")
        )
    assert found == 0


async def test_an_oversized_event_is_413(billing: httpx.AsyncClient) -> None:
    payload = json.dumps({"id": "evt_big", "type": "x", "data": {"object": {"id": "x"}}})
    oversized = payload + " " * (600 * 1024)
    reply = await billing.post(
        "/api/webhooks/stripe", content=oversized, headers={"Stripe-Signature": sign(oversized)}
    )
    assert reply.status_code == 413


@pytest.mark.parametrize("body", ["[1, 2]", '"an event"', "42", "null"])
async def test_signed_body_that_is_not_an_event_object_is_400(
    billing: httpx.AsyncClient, body: str
) -> None:
    reply = await billing.post(
        "/api/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_json"


async def test_replayed_event_that_is_not_ours_says_replayed(billing: httpx.AsyncClient) -> None:
    obj = {"id": "cus_not_ours", "object": "customer"}
    first = await send_event(billing, "customer.created", obj, "evt_not_ours")
    again = await send_event(billing, "customer.created", obj, "evt_not_ours")
    assert first.status_code == again.status_code == 200
    assert "replayed" not in first.json() and again.json()["replayed"] is True


def signed_post(client: httpx.AsyncClient, event: dict[str, Any]) -> Any:
    payload = json.dumps(event)
    return client.post(
        "/api/webhooks/stripe",
        content=payload,
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(payload)},
    )


def event_with(**changes: Any) -> dict[str, Any]:
    obj = {"id": "sub_odd", "object": "subscription", "customer": "cus_odd"}
    event: dict[str, Any] = {
        "id": "evt_odd",
        "type": "customer.subscription.updated",
        "created": int(time.time()),
        "data": {"object": obj},
    }
    for key, value in changes.items():
        if key.startswith("object_"):
            obj[key.removeprefix("object_")] = value
        else:
            event[key] = value
    return event


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"object_metadata": "x"}, 200),
        ({"object_metadata": [1]}, 200),
        ({"object_metadata": {"user_id": ["hook-odd"]}}, 200),
        ({"object_customer": "cus_\x00odd"}, 200),
        ({"object_customer": {"id": 5}}, 200),
        ({"type": "customer.subscription.updated\x00"}, 422),
        ({"type": "x" * 200}, 422),
        ({"type": 7}, 422),
        ({"id": "evt_\x00odd"}, 422),
        ({"id": "e" * 300}, 422),
        ({"object_id": "sub_\x00odd"}, 422),
        ({"created": 10**30}, 422),
        ({"created": -1}, 422),
        ({"created": "1767225600"}, 422),
        ({"created": True}, 422),
    ],
)
async def test_signed_events_with_odd_fields_are_acknowledged_or_4xx(
    billing: httpx.AsyncClient, pg: AsyncEngine, changes: dict[str, Any], status: int
) -> None:
    """Only Stripe can sign, but a malformed field must still never be a 5xx (a 5xx makes
    Stripe retry it for days): acknowledged and ignored, or refused with a 422."""
    reply = await signed_post(billing, event_with(**changes))
    assert reply.status_code == status, reply.text
    assert await stored(pg, "evt_odd") == (1 if status == 200 else 0)
    if status == 200:
        assert reply.json()["applied"] is False


async def invoice_charge(stripe_client: stripe.StripeClient, invoice_id: str) -> str:
    invoice = await stripe_client.v1.invoices.retrieve_async(invoice_id)
    # localstripe's invoices still name their PaymentIntent (API versions before 2025-03-31).
    intent_id = str(invoice.to_dict()["payment_intent"])
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    charge = intent.to_dict()["latest_charge"]
    return str(charge["id"] if isinstance(charge, dict) else charge)


async def test_refunds_partial_then_full_show_in_the_payment_history(
    billing: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    user = "hook-refund"
    subscription = await subscribed(billing, stripe_client, user, "PLUS")
    charge_id = await invoice_charge(stripe_client, subscription["latest_invoice"])

    async def refund(cents: int) -> dict[str, Any]:
        await stripe_client.v1.refunds.create_async({"charge": charge_id, "amount": cents})
        charge = (await stripe_client.v1.charges.retrieve_async(charge_id)).to_dict()
        # The event's copy lies: the handler must read Stripe's.
        reply = await send_event(billing, "charge.refunded", {**charge, "amount_refunded": 1})
        assert reply.status_code == 200 and reply.json()["applied"] is True, reply.text
        [payment] = (await billing.get("/api/payments", headers=auth(user))).json()["payments"]
        return dict(payment)

    payment = await refund(300)
    assert (payment["status"], payment["amount"], payment["amount_refunded"]) == (
        "succeeded",
        990,
        300,
    )
    payment = await refund(690)
    assert (payment["status"], payment["amount_refunded"]) == ("refunded", 990)

    # Re-reading the paid invoice (any later invoice event) does not undo the refund.
    invoice = await stripe_client.v1.invoices.retrieve_async(subscription["latest_invoice"])
    reply = await send_event(billing, "invoice.payment_succeeded", invoice.to_dict())
    assert reply.status_code == 200
    [payment] = (await billing.get("/api/payments", headers=auth(user))).json()["payments"]
    assert (payment["status"], payment["amount_refunded"], payment["plan"]) == (
        "refunded",
        990,
        "PLUS",
    )


async def test_a_refund_before_its_invoice_is_recorded_is_kept(
    billing: httpx.AsyncClient,
    stripe_client: stripe.StripeClient,
    no_webhooks: None,
) -> None:
    """A renewal is paid and refunded in Stripe before its invoice's own event reaches us:
    charge.refunded records the payment, refunded, and the late invoice event leaves it so."""
    user = "hook-refund-first"
    subscription = await subscribed(billing, stripe_client, user, "PLUS")
    renewed = await bill_a_renewal(stripe_client, subscription["id"])
    assert isinstance(renewed.latest_invoice, str)
    invoice = (await stripe_client.v1.invoices.retrieve_async(renewed.latest_invoice)).to_dict()
    assert invoice["status"] == "paid"
    charge_id = await invoice_charge(stripe_client, invoice["id"])
    await stripe_client.v1.refunds.create_async({"charge": charge_id})
    charge = (await stripe_client.v1.charges.retrieve_async(charge_id)).to_dict()

    async def renewal() -> tuple[str, int, int]:
        listed = (await billing.get("/api/payments", headers=auth(user))).json()["payments"]
        [payment] = [p for p in listed if p["id"] == invoice["id"]]
        return payment["status"], payment["amount"], payment["amount_refunded"]

    reply = await send_event(billing, "charge.refunded", charge)
    assert reply.status_code == 200 and reply.json()["applied"] is True, reply.text
    assert await renewal() == ("refunded", invoice["amount_paid"], invoice["amount_paid"])
    for kind in ("invoice.paid", "invoice.payment_succeeded"):
        reply = await send_event(billing, kind, invoice)
        assert reply.status_code == 200 and reply.json()["applied"] is True, reply.text
    assert await renewal() == ("refunded", invoice["amount_paid"], invoice["amount_paid"])
