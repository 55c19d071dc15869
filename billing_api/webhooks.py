"""Stripe webhooks: signature and age checked, each event id applied once, and the state
written is the one Stripe holds now, never the event's copy of it.

Events arrive late, twice, or out of order, so the event only says *what* changed: the handler
fetches the subscription (or invoice) from Stripe and records that, under the user's lock.
Whatever order events come in, the last one applied leaves what Stripe holds last. The event id
is stored in the same transaction, so a replay is answered without touching anything and an
event whose handling failed (Stripe unreachable: 503) is applied when Stripe sends it again.
"""

import logging
from typing import Any

import stripe
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_api import metrics, records, stripe_api
from billing_api.services import Services
from quota_common.codes import ApiError, ErrorCode
from quota_common.keys import is_valid_id

log = logging.getLogger("billing_api")

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }
)
INVOICE_EVENTS = frozenset(
    {
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.finalized",
        "invoice.voided",
        "invoice.marked_uncollectible",
    }
)
REFUND_EVENTS = frozenset({"charge.refunded"})


def parse(services: Services, payload: bytes, signature: str | None) -> dict[str, Any]:
    settings = services.settings
    try:
        event = stripe.Webhook.construct_event(
            payload,
            signature,
            settings.stripe_webhook_secret,
            tolerance=settings.stripe_webhook_tolerance_s,
        )
    except stripe.SignatureVerificationError:
        metrics.WEBHOOK_EVENTS.labels("refused").inc()
        raise ApiError(
            400, ErrorCode.BAD_SIGNATURE, "bad, missing or stale Stripe-Signature"
        ) from None
    except (ValueError, AttributeError, TypeError):
        # ValueError: not JSON; the others: JSON that is not an event object ([1, 2], "x").
        metrics.WEBHOOK_EVENTS.labels("refused").inc()
        raise ApiError(400, ErrorCode.INVALID_JSON, "the body is not a JSON event") from None
    body = event.to_dict()
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    event_id = body.get("id")
    if not (
        isinstance(event_id, str)
        and 1 <= len(event_id) <= 255
        and event_id.isprintable()
        and isinstance(body.get("type"), str)
        and type(body.get("created", 0)) is int
        and isinstance(obj, dict)
        and isinstance(obj.get("id"), str)
    ):
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, "the event lacks id, type or data.object")
    return dict(body)


def _metadata_user(obj: dict[str, Any]) -> str | None:
    user = (obj.get("metadata") or {}).get("user_id")
    return user if is_valid_id(user) else None


async def _user_of(services: Services, obj: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    """(user id, customer id, whether the customer must be recorded). Our customers table
    decides; the metadata we put on Stripe objects covers a customer whose creation we never
    recorded (a crash between Stripe's answer and our commit)."""
    customer = stripe_api.object_id(obj.get("customer"))
    if customer is None:
        return None, None, False
    async with services.engine.connect() as conn:
        user = await records.user_of_customer(conn, customer)
    if user is not None:
        return user, customer, False
    return _metadata_user(obj), customer, True


async def _apply(
    services: Services, conn: AsyncConnection, user_id: str, event: dict[str, Any]
) -> None:
    kind, obj, created = event["type"], event["data"]["object"], int(event.get("created") or 0)
    if kind in REFUND_EVENTS:
        invoice_id = stripe_api.object_id(obj.get("invoice"))
        if invoice_id and obj.get("refunded"):
            await records.mark_refunded(conn, invoice_id)
        return
    subscription_id: str | None = obj["id"]
    if kind in INVOICE_EVENTS:
        invoice = await stripe_api.retrieve_invoice(services.stripe, obj["id"])
        if invoice is None:
            return
        await records.save_invoice(conn, user_id, invoice)
        # localstripe never sends customer.subscription.updated: a payment's effect on the
        # subscription (past_due, active again) is read here.
        subscription_id = stripe_api.invoice_subscription(invoice)
    if subscription_id is None:
        return
    subscription = await stripe_api.retrieve_subscription(services.stripe, subscription_id)
    if subscription is not None:
        await records.save_subscription(conn, user_id, subscription, created)


async def handle(services: Services, payload: bytes, signature: str | None) -> dict[str, Any]:
    event = parse(services, payload, signature)
    kind = event["type"]
    user_id, customer, unrecorded = None, None, False
    if kind in SUBSCRIPTION_EVENTS | INVOICE_EVENTS | REFUND_EVENTS:
        user_id, customer, unrecorded = await _user_of(services, event["data"]["object"])
    if user_id is None:
        # Not ours to act on (another event type, or a customer we never made); remembered
        # so that Stripe's retries are answered the same way.
        async with services.engine.begin() as conn:
            first = await records.record_event(conn, event["id"], kind)
        metrics.WEBHOOK_EVENTS.labels("ignored").inc()
        answer: dict[str, Any] = {"ok": True, "event": event["id"], "applied": False}
        if not first:
            answer["replayed"] = True
        return answer
    async with services.engine.begin() as conn:
        await records.lock_user(conn, user_id)
        if not await records.record_event(conn, event["id"], kind):
            metrics.WEBHOOK_EVENTS.labels("replayed").inc()
            return {"ok": True, "event": event["id"], "applied": False, "replayed": True}
        if unrecorded and customer is not None:
            await records.save_customer(conn, user_id, customer)
        await _apply(services, conn, user_id, event)
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    metrics.WEBHOOK_EVENTS.labels("applied").inc()
    log.info("stripe event applied", extra={"event": event["id"], "type": kind, "user_id": user_id})
    return {"ok": True, "event": event["id"], "applied": True}
