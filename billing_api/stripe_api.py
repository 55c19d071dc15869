"""Every Stripe call the billing API makes, through the official SDK's async client.

Plans are Stripe Plans (not Prices: localstripe has no Prices API, and Plans work on both), one
per paid plan, price and currency, with ids derived from those so a price change makes a new
plan and old subscriptions keep theirs. Each plan carries `metadata.quota_plan`, which is how a
subscription item is mapped back to our plan name whatever its price. Create calls carry
idempotency keys made from our own ids (the user for the customer, the subscribe attempt's row
for a subscription), so a retried request never makes a second object.

Objects are returned as plain dicts (`to_dict()`): SDK objects are not dicts, and the fields
that moved between API versions (periods on items or on the subscription) are read in one place.
"""

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import stripe

from quota_common.plans import PAID_PLANS, Plan
from quota_common.settings import Settings

Obj = dict[str, Any]
# The longest one Stripe call may take from connecting to its last byte, enforced as a whole.
CALL_S = 20.0
# How long Stripe itself may still work on a request it received (its own SDKs wait 80 s for an
# answer); a request we gave up on can still take effect until then.
STRIPE_REQUEST_MAX_S = 80.0
# Metadata key on subscriptions: the subscribe_attempts row that made it.
ATTEMPT_KEY = "subscribe_attempt"
# A customer has one subscription per subscribe, and subscribes are rate limited.
SUBSCRIPTIONS_LISTED_MAX = 100
ENDED_STATUSES = ("canceled", "incomplete_expired")
# Subscriptions that give no plan now but can become paid again: an incomplete one when its first
# payment is completed (3-D Secure), a paused one when resumed, an unpaid one when its invoice is
# paid.
DORMANT_STATUSES = ("incomplete", "paused", "unpaid")


class CappedHTTPXClient(stripe.HTTPXClient):
    """httpx's timeout bounds each phase (connect, every read, ...), so a server that trickles
    its answer never trips it; this one caps the whole call at `call_s`."""

    def __init__(self, call_s: float) -> None:
        super().__init__(timeout=call_s)
        self.call_s = call_s

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            async with asyncio.timeout(self.call_s):
                return await super().request_async(method, url, headers, post_data)
        except TimeoutError:
            # What the SDK raises for any other network failure, so callers see one kind.
            message = f"Stripe did not answer within {self.call_s} s"
            raise stripe.APIConnectionError(message, should_retry=True) from None  # type: ignore[no-untyped-call]


def client(settings: Settings, call_s: float = CALL_S) -> stripe.StripeClient:
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_api_key or "",
        base_addresses=cast(Any, base),
        # Retrying is the caller's choice (idempotency keys make it safe); the SDK's own retries
        # would hold a user's request, and a per-user lock, for seconds.
        max_network_retries=0,
        http_client=CappedHTTPXClient(call_s),
    )


@dataclass(frozen=True, slots=True)
class Payment:
    """What Stripe holds about the paying of one invoice, as its payment status needs it: the
    PaymentIntent of an open invoice (waiting for 3-D Secure, or failed), the charge of a paid
    one (what was refunded)."""

    intent: Obj | None = None
    charge: Obj | None = None


def plan_id(plan: Plan, currency: str) -> str:
    return f"quota_{plan.name.lower()}_{plan.price_cents}_{currency}_month"


def plan_name(stripe_plan: Obj | None) -> str | None:
    """Our plan name for a Stripe plan, from the metadata we gave it."""
    if not stripe_plan:
        return None
    name = (stripe_plan.get("metadata") or {}).get("quota_plan")
    return name if name in PAID_PLANS else None


async def ensure_plan(api: stripe.StripeClient, plan: Plan, currency: str) -> str:
    """The Stripe plan id of a paid plan, created when Stripe does not have it yet. Looked up
    on every use (subscribe and change are rare) so a plan deleted in Stripe comes back."""
    pid = plan_id(plan, currency)
    try:
        await api.v1.plans.retrieve_async(pid)
    except stripe.InvalidRequestError as error:
        if error.http_status != 404:
            raise
        params: Any = {
            "id": pid,
            "amount": plan.price_cents,
            "currency": currency,
            "interval": "month",
            "product": {"name": f"Quota {plan.name}"},
            "metadata": {"quota_plan": plan.name},
        }
        await api.v1.plans.create_async(params, {"idempotency_key": f"quota-plan-{pid}"})
    return pid


async def create_customer(api: stripe.StripeClient, user_id: str) -> str:
    params: Any = {"metadata": {"user_id": user_id}}
    customer = await api.v1.customers.create_async(
        params, {"idempotency_key": f"quota-customer-{user_id}"}
    )
    return str(customer.id)


async def set_payment_method(
    api: stripe.StripeClient, customer_id: str, payment_method: str
) -> None:
    """Attaches the card and makes it the one invoices charge (localstripe refuses a
    subscription's own default_payment_method; the customer's default works on both)."""
    attached = await api.v1.payment_methods.attach_async(
        payment_method, cast(Any, {"customer": customer_id})
    )
    params: Any = {"invoice_settings": {"default_payment_method": attached.id}}
    await api.v1.customers.update_async(customer_id, params)


async def create_subscription(
    api: stripe.StripeClient, customer_id: str, user_id: str, stripe_plan: str, attempt_id: int
) -> Obj:
    """The subscription of one subscribe attempt: its idempotency key and metadata name our own
    attempt row, so the attempt is found again whatever happened to Stripe's answer."""
    params: Any = {
        "customer": customer_id,
        "items": [{"plan": stripe_plan}],
        "metadata": {"user_id": user_id, ATTEMPT_KEY: str(attempt_id)},
        "expand": ["latest_invoice"],
    }
    subscription = await api.v1.subscriptions.create_async(
        params, {"idempotency_key": f"quota-subscribe-{attempt_id}"}
    )
    return subscription.to_dict()


async def attempt_subscription(
    api: stripe.StripeClient, customer_id: str, attempt_id: int
) -> Obj | None:
    """The subscription Stripe made for a subscribe attempt, or None when it made none. Read
    from the customer's list (consistent, unlike Stripe's search), so it holds after the
    idempotency key's 24 hours too."""
    params: Any = {
        "customer": customer_id,
        "status": "all",
        "limit": SUBSCRIPTIONS_LISTED_MAX,
        "expand": ["data.latest_invoice"],
    }
    listed = await api.v1.subscriptions.list_async(params)
    for subscription in listed.data:
        found = subscription.to_dict()
        if (found.get("metadata") or {}).get(ATTEMPT_KEY) == str(attempt_id):
            return found
    return None


def attempt_of(subscription: Obj) -> int | None:
    """The id of the subscribe attempt that made a subscription, from its metadata."""
    metadata = subscription.get("metadata")
    value = metadata.get(ATTEMPT_KEY) if isinstance(metadata, dict) else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


async def change_plan(api: stripe.StripeClient, subscription: Obj, stripe_plan: str | None) -> Obj:
    """Swaps the subscription's one item to `stripe_plan` (None: keeps it) and clears a
    scheduled cancellation: a user who picks a plan wants to keep it. proration_behavior is
    left out on purpose: Stripe's default prorates, and localstripe fails when it is given."""
    params: Any = {}
    if stripe_plan is not None:
        item = subscription["items"]["data"][0]
        params["items"] = [{"id": item["id"], "plan": stripe_plan}]
    if subscription.get("cancel_at_period_end"):
        params["cancel_at_period_end"] = False
    if not params:
        return subscription
    updated = await api.v1.subscriptions.update_async(subscription["id"], params)
    return updated.to_dict()


async def cancel_at_period_end(api: stripe.StripeClient, subscription_id: str) -> Obj:
    params: Any = {"cancel_at_period_end": True}
    updated = await api.v1.subscriptions.update_async(subscription_id, params)
    return updated.to_dict()


async def cancel_now(api: stripe.StripeClient, subscription_id: str) -> Obj | None:
    """Ends the subscription at once. One Stripe refuses to cancel because it has ended already
    (a retry after a lost answer) is read back instead; None when Stripe does not know it."""
    try:
        return (await api.v1.subscriptions.cancel_async(subscription_id)).to_dict()
    except stripe.InvalidRequestError:
        found = await retrieve_subscription(api, subscription_id)
        if found is not None and found.get("status") not in ENDED_STATUSES:
            raise
        return found


async def void_invoice(api: stripe.StripeClient, invoice_id: str) -> bool:
    """Voids an unpaid invoice so it can no longer be paid; False when Stripe refuses, the
    invoice being paid (or otherwise no longer open)."""
    try:
        await api.v1.invoices.void_invoice_async(invoice_id)
    except stripe.InvalidRequestError:
        return False
    return True


async def end_dormant(api: stripe.StripeClient, subscription: Obj) -> None:
    """Ends a subscription of DORMANT_STATUSES (as retrieve_subscription returns it, with its
    latest invoice) unless it has just been paid. An incomplete one's open first invoice is
    voided first: Stripe voids only an unpaid invoice, so a 3-D Secure payment completed
    meanwhile either came first (the void is refused and the subscription is left as it is) or
    can no longer happen. Cancelling alone could end a subscription paid a moment before."""
    invoice = subscription.get("latest_invoice")
    if (
        subscription.get("status") == "incomplete"
        and isinstance(invoice, dict)
        and invoice.get("status") == "open"
        and not await void_invoice(api, invoice["id"])
    ):
        return
    await cancel_now(api, subscription["id"])


async def _unless_missing(fetch: Awaitable[stripe.StripeObject]) -> Obj | None:
    """The object as a dict; None when Stripe does not know it (404)."""
    try:
        return (await fetch).to_dict()
    except stripe.InvalidRequestError as error:
        if error.http_status == 404:
            return None
        raise


async def retrieve_subscription(api: stripe.StripeClient, subscription_id: str) -> Obj | None:
    """The subscription as Stripe holds it now, with its latest invoice."""
    params: Any = {"expand": ["latest_invoice"]}
    return await _unless_missing(api.v1.subscriptions.retrieve_async(subscription_id, params))


async def retrieve_invoice(api: stripe.StripeClient, invoice_id: str) -> Obj | None:
    return await _unless_missing(api.v1.invoices.retrieve_async(invoice_id))


async def retrieve_charge(api: stripe.StripeClient, charge_id: str) -> Obj | None:
    return await _unless_missing(api.v1.charges.retrieve_async(charge_id))


async def invoice_intent(api: stripe.StripeClient, invoice: Obj) -> Obj | None:
    """The PaymentIntent paying an invoice: `invoice.payment_intent` before API 2025-03-31
    (and in localstripe), the invoice's payments from then on."""
    intent_id = object_id(invoice.get("payment_intent"))
    if intent_id is None:
        params: Any = {"invoice": invoice["id"], "limit": 1}
        for paid_by in (await api.v1.invoice_payments.list_async(params)).data:
            intent_id = object_id(paid_by.to_dict().get("payment", {}).get("payment_intent"))
    if intent_id is None:
        return None
    return (await api.v1.payment_intents.retrieve_async(intent_id)).to_dict()


async def charge_invoice(api: stripe.StripeClient, charge: Obj) -> str | None:
    """The invoice a charge paid: `charge.invoice` before API 2025-03-31, the invoice payment
    of its PaymentIntent from then on (localstripe has it on the PaymentIntent)."""
    found = object_id(charge.get("invoice"))
    intent_id = object_id(charge.get("payment_intent"))
    if found is not None or intent_id is None:
        return found
    intent = (await api.v1.payment_intents.retrieve_async(intent_id)).to_dict()
    found = object_id(intent.get("invoice"))
    if found is not None:
        return found
    params: Any = {"payment": {"type": "payment_intent", "payment_intent": intent_id}, "limit": 1}
    for paid in (await api.v1.invoice_payments.list_async(params)).data:
        found = object_id(paid.to_dict().get("invoice"))
    return found


async def invoice_payment(api: stripe.StripeClient, invoice: Obj) -> Payment:
    """How the invoice is being paid, read from Stripe now. A paid invoice's charge is
    `invoice.charge` before API 2025-03-31 (and in localstripe), its PaymentIntent's latest
    charge from then on."""
    status = invoice.get("status")
    if status == "open":
        return Payment(intent=await invoice_intent(api, invoice))
    if status != "paid":
        return Payment()
    charge_id = object_id(invoice.get("charge"))
    if charge_id is None:
        intent = await invoice_intent(api, invoice)
        charge_id = object_id(intent.get("latest_charge")) if intent else None
    if charge_id is None:
        # Nothing was charged (a zero invoice, or paid from the customer's balance).
        return Payment()
    return Payment(charge=await retrieve_charge(api, charge_id))


def object_id(value: object) -> str | None:
    """An id field that may hold the id or the expanded object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def subscription_period(subscription: Obj) -> tuple[int, int]:
    """(start, end) unix seconds. From API 2025 on the period sits on the items; older API
    versions and localstripe have it on the subscription only."""
    items = (subscription.get("items") or {}).get("data") or []
    item = items[0] if items else {}
    start = item.get("current_period_start") or subscription.get("current_period_start")
    end = item.get("current_period_end") or subscription.get("current_period_end")
    return int(start or 0), int(end or 0)


def subscription_plan(subscription: Obj) -> str | None:
    items = (subscription.get("items") or {}).get("data") or []
    return plan_name(items[0].get("plan")) if items else None


def invoice_subscription(invoice: Obj) -> str | None:
    """The invoice's subscription id: `subscription` before API 2025, `parent` after."""
    found = object_id(invoice.get("subscription"))
    if found:
        return found
    parent = invoice.get("parent") or {}
    return object_id((parent.get("subscription_details") or {}).get("subscription"))


def invoice_plan(invoice: Obj) -> str | None:
    for line in (invoice.get("lines") or {}).get("data") or []:
        name = plan_name(line.get("plan"))
        if name:
            return name
    return None
