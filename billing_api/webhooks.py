"""Stripe webhooks: signature and age checked, each event id applied once, and the state
written is the one Stripe holds now, never the event's copy of it.

Events arrive late, twice, or out of order, so the event only says *what* changed: the handler
fetches the subscription (or invoice, or charge) from Stripe and records that, under the user's
lease. Whatever order events come in, the last one applied leaves what Stripe holds last. The
event id is stored in the transaction that writes, so a replay is answered without touching
anything and an event whose handling failed (Stripe unreachable: 503) is applied when Stripe
sends it again. The fields the handler reads from the event itself are checked first: a signed
event with a malformed one is refused with a 4xx, never a 5xx.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import stripe
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_api import locks, metrics, records, stripe_api
from billing_api.fields import STRIPE_ID_RE
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
        "invoice.payment_action_required",
        "invoice.finalized",
        "invoice.voided",
        "invoice.marked_uncollectible",
    }
)
REFUND_EVENTS = frozenset({"charge.refunded"})
HANDLED = SUBSCRIPTION_EVENTS | INVOICE_EVENTS | REFUND_EVENTS
EVENT_TYPE_RE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
EVENT_TYPE_CHARS_MAX = 128
# Unix seconds; anything beyond is not a Stripe timestamp (and would overflow BIGINT later).
CREATED_MAX = 10**11


def _refused(message: str) -> ApiError:
    metrics.WEBHOOK_EVENTS.labels("refused").inc()
    return ApiError(422, ErrorCode.VALIDATION_ERROR, message)


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
    kind, event_id, created = body.get("type"), body.get("id"), body.get("created", 0)
    if not (
        isinstance(event_id, str)
        and isinstance(kind, str)
        and isinstance(obj, dict)
        and isinstance(obj.get("id"), str)
    ):
        raise _refused("the event lacks id, type or data.object")
    if not STRIPE_ID_RE.fullmatch(event_id) or not STRIPE_ID_RE.fullmatch(obj["id"]):
        raise _refused("the event's id or its object's id is not a Stripe id")
    if len(kind) > EVENT_TYPE_CHARS_MAX or not EVENT_TYPE_RE.fullmatch(kind):
        raise _refused("the event's type is not a Stripe event type")
    if type(created) is not int or not 0 <= created <= CREATED_MAX:
        raise _refused("the event's created is not a unix time")
    return dict(body)


def _metadata_user(obj: dict[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user if is_valid_id(user) else None


async def _user_of(services: Services, obj: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    """(user id, customer id, whether the customer must be recorded). Our customers table
    decides; the metadata we put on Stripe objects covers a customer whose creation we never
    recorded (a crash between Stripe's answer and our commit). A customer field that is no
    Stripe id names nobody of ours."""
    customer = stripe_api.object_id(obj.get("customer"))
    if customer is None or not STRIPE_ID_RE.fullmatch(customer):
        return None, None, False
    async with services.engine.connect() as conn:
        user = await records.user_of_customer(conn, customer)
    if user is not None:
        return user, customer, False
    return _metadata_user(obj), customer, True


@dataclass(frozen=True, slots=True)
class Current:
    """What Stripe holds now about the object an event is about."""

    subscription: stripe_api.Obj | None = None
    invoice: stripe_api.Obj | None = None
    payment: stripe_api.Payment = field(default_factory=stripe_api.Payment)


async def _fetch(services: Services, kind: str, object_id: str) -> Current:
    """Stripe's current copy, read outside any transaction. A refund is recorded through the
    invoice its charge paid, re-read whole, so it lands whether or not the invoice was
    recorded yet, and no later invoice event can undo it."""
    api = services.stripe
    invoice_id = object_id if kind in INVOICE_EVENTS else None
    if kind in REFUND_EVENTS:
        charge = await stripe_api.retrieve_charge(api, object_id)
        invoice_id = await stripe_api.charge_invoice(api, charge) if charge else None
        if invoice_id is None:
            return Current()
    if invoice_id is None:
        return Current(subscription=await stripe_api.retrieve_subscription(api, object_id))
    invoice = await stripe_api.retrieve_invoice(api, invoice_id)
    if invoice is None:
        return Current()
    payment = await stripe_api.invoice_payment(api, invoice)
    # localstripe never sends customer.subscription.updated: a payment's effect on the
    # subscription (past_due, active again) is read here.
    subscription_id = stripe_api.invoice_subscription(invoice)
    subscription = None
    if subscription_id is not None:
        subscription = await stripe_api.retrieve_subscription(api, subscription_id)
    return Current(subscription=subscription, invoice=invoice, payment=payment)


async def _write(conn: AsyncConnection, user_id: str, current: Current, created: int) -> None:
    if current.invoice is not None:
        # From API 2025-03-31 invoice lines no longer name their plan: the subscription's is
        # the one the invoice bills.
        plan = stripe_api.subscription_plan(current.subscription) if current.subscription else None
        await records.save_invoice(conn, user_id, current.invoice, current.payment, plan)
    if current.subscription is not None:
        await records.save_subscription(conn, user_id, current.subscription, created)


def _replayed(event_id: str) -> dict[str, Any]:
    metrics.WEBHOOK_EVENTS.labels("replayed").inc()
    return {"ok": True, "event": event_id, "applied": False, "replayed": True}


async def handle(services: Services, payload: bytes, signature: str | None) -> dict[str, Any]:
    event = parse(services, payload, signature)
    kind, event_id, obj = event["type"], event["id"], event["data"]["object"]
    user_id, customer, unrecorded = None, None, False
    if kind in HANDLED:
        user_id, customer, unrecorded = await _user_of(services, obj)
    if user_id is None:
        # Not ours to act on (another event type, or a customer we never made); remembered
        # so that Stripe's retries are answered the same way.
        async with services.engine.begin() as conn:
            first = await records.record_event(conn, event_id, kind)
        metrics.WEBHOOK_EVENTS.labels("ignored").inc()
        answer: dict[str, Any] = {"ok": True, "event": event_id, "applied": False}
        if not first:
            answer["replayed"] = True
        return answer
    async with locks.held(services.engine, services.queues, user_id) as lease:
        async with services.engine.connect() as conn:
            seen = await records.event_seen(conn, event_id)
        if seen:
            return _replayed(event_id)
        current = await _fetch(services, kind, obj["id"])
        async with locks.fenced(services.engine, lease) as conn:
            if not await records.record_event(conn, event_id, kind):
                return _replayed(event_id)
            if unrecorded and customer is not None:
                await records.save_customer(conn, user_id, customer)
            await _write(conn, user_id, current, int(event.get("created") or 0))
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    metrics.WEBHOOK_EVENTS.labels("applied").inc()
    log.info("stripe event applied", extra={"event": event_id, "type": kind, "user_id": user_id})
    return {"ok": True, "event": event_id, "applied": True}
