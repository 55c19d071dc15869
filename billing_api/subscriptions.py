"""Subscribe, change plan, cancel. Each runs under the user's lease (billing_api.locks), with
the Stripe calls between short transactions and never inside one. Each result is recorded at
once (localstripe sends no webhook for a plan change or a scheduled cancellation, and users
expect their quota to follow immediately), then pushed to the quota. Webhooks that report the
same changes later re-read Stripe and write the same rows.

Subscribe takes atomic phases (brandur/rocket-rides-atomic): a subscribe attempt row is
committed first, and its id makes the Stripe idempotency key and the subscription's metadata.
An attempt whose answer was lost stays open. The user's next subscribe looks it up in Stripe
and records the subscription it made, or closes it once it is certain Stripe made none; the
subscription's own webhook records it too. So a retry never buys a second subscription.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_api import locks, metrics, records, stripe_api, views
from billing_api.services import Services
from quota_common.accounts import PAID_STATUSES, plan_period
from quota_common.codes import ApiError, ErrorCode

# An attempt Stripe shows no subscription for may still be in flight there (a timed-out call)
# until this long after it started; Stripe ends any request well before.
ATTEMPT_SETTLE = timedelta(seconds=120)
log = logging.getLogger("billing_api")


def now_s() -> int:
    return int(datetime.now(UTC).timestamp())


async def current(services: Services, conn: AsyncConnection, user_id: str) -> dict[str, Any]:
    """The subscription that sets the user's quota now, or FREE, as load_account sees it."""
    now = datetime.now(UTC)
    row = await records.paid_subscription(conn, user_id)
    plan, start, end, _ = await plan_period(conn, user_id, services.plans, now)
    if row is None or plan != row.plan:
        return views.free(start, end)
    return views.subscription(row)


async def _view(services: Services, user_id: str) -> dict[str, Any]:
    async with services.engine.connect() as conn:
        return await current(services, conn, user_id)


def _lease(services: Services, user_id: str) -> AbstractAsyncContextManager[locks.Lease]:
    return locks.held(services.engine, services.queues, user_id)


async def _paid_row(services: Services, user_id: str) -> Row[Any] | None:
    async with services.engine.connect() as conn:
        return await records.paid_subscription(conn, user_id)


async def _record(
    conn: AsyncConnection,
    user_id: str,
    subscription: stripe_api.Obj,
    plan: str,
    intent: stripe_api.Obj | None = None,
) -> None:
    """A subscription Stripe made for us, with its first invoice when Stripe returned it."""
    await records.save_subscription(conn, user_id, subscription, now_s())
    invoice = subscription.get("latest_invoice")
    if isinstance(invoice, dict):
        await records.save_invoice(conn, user_id, invoice, plan, intent)


async def _customer(services: Services, lease: locks.Lease, user_id: str) -> str:
    """The user's one Stripe customer, committed before anything is bought with it, so a
    failure later never forgets a customer Stripe already has."""
    async with services.engine.connect() as conn:
        customer = await records.customer_of(conn, user_id)
    if customer is None:
        customer = await stripe_api.create_customer(services.stripe, user_id)
        async with locks.fenced(services.engine, lease) as conn:
            await records.save_customer(conn, user_id, customer)
        log.info("stripe customer created", extra={"user_id": user_id})
    return customer


async def _settle_open_attempt(services: Services, lease: locks.Lease, user_id: str) -> None:
    """Records what became of a subscribe whose outcome is not known (its answer was lost)."""
    async with services.engine.connect() as conn:
        attempt = await records.open_attempt(conn, user_id)
    if attempt is None:
        return
    made = await stripe_api.attempt_subscription(
        services.stripe, attempt.stripe_customer_id, attempt.id
    )
    if made is None and attempt.age < ATTEMPT_SETTLE:
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            "the previous subscribe is still being settled with Stripe; try again in a minute",
            {"Retry-After": str(int(ATTEMPT_SETTLE.total_seconds()))},
        )
    async with locks.fenced(services.engine, lease) as conn:
        if made is None:
            await records.finish_attempt(conn, user_id, attempt.id, None)
        else:
            await _record(conn, user_id, made, attempt.plan)
    outcome = "abandoned" if made is None else "found"
    metrics.SUBSCRIBE_RECOVERIES.labels(outcome).inc()
    log.info("subscribe attempt settled", extra={"user_id": user_id, "outcome": outcome})


async def _refuse_if_paid(services: Services, user_id: str) -> None:
    row = await _paid_row(services, user_id)
    if row is None or (row.cancel_at_period_end and row.current_period_end <= datetime.now(UTC)):
        return
    advice = "use /api/change-plan to switch plans"
    if row.cancel_at_period_end:
        advice = f'it ends with the period; /api/change-plan {{"plan": "{row.plan}"}} keeps it'
    raise ApiError(
        409,
        ErrorCode.CONFLICT,
        f"a {row.plan} subscription is already {row.status}; {advice}",
        subscription_id=row.stripe_subscription_id,
        plan=row.plan,
    )


async def _close_incomplete(services: Services, lease: locks.Lease, user_id: str) -> None:
    """A subscription whose first payment failed is replaced by the new one, not left beside
    it to be paid by accident later."""
    async with services.engine.connect() as conn:
        unpaid = await records.subscription_ids_with_status(conn, user_id, ("incomplete",))
    for subscription_id in unpaid:
        closed = await stripe_api.cancel_now(services.stripe, subscription_id)
        if closed is not None:
            async with locks.fenced(services.engine, lease) as conn:
                await records.save_subscription(conn, user_id, closed, now_s())


@asynccontextmanager
async def _attempt(
    services: Services, lease: locks.Lease, user_id: str, plan: str, customer: str
) -> AsyncIterator[int]:
    """A committed subscribe attempt. When Stripe answers the create with a refusal, it made
    nothing and the attempt is closed; with no answer (or a 5xx) the outcome is unknown and the
    attempt stays open for _settle_open_attempt."""
    async with locks.fenced(services.engine, lease) as conn:
        attempt_id = await records.start_attempt(conn, user_id, plan, customer)
    try:
        yield attempt_id
    except stripe.StripeError as error:
        if error.http_status is not None and error.http_status < 500:
            async with locks.fenced(services.engine, lease) as conn:
                await records.finish_attempt(conn, user_id, attempt_id, None)
        raise


def _first_payment_refused(subscription: stripe_api.Obj, intent: stripe_api.Obj | None) -> ApiError:
    payment_status = str(intent.get("status")) if intent else None
    about = {
        "subscription_id": subscription["id"],
        "subscription_status": str(subscription.get("status")),
        "payment_status": payment_status,
    }
    if intent is not None and payment_status == "requires_action":
        return ApiError(
            402,
            ErrorCode.PAYMENT_FAILED,
            "the card needs authentication: complete it with client_secret in Stripe.js; "
            "the plan applies once Stripe reports the payment",
            client_secret=intent.get("client_secret"),
            **about,
        )
    return ApiError(
        402,
        ErrorCode.PAYMENT_FAILED,
        "the first payment failed; subscribe again with another payment method",
        **about,
    )


async def subscribe(
    services: Services, user_id: str, plan: str, payment_method: str | None
) -> dict[str, Any]:
    async with _lease(services, user_id) as lease:
        await _settle_open_attempt(services, lease, user_id)
        await _refuse_if_paid(services, user_id)
        customer = await _customer(services, lease, user_id)
        if payment_method is not None:
            await stripe_api.set_payment_method(services.stripe, customer, payment_method)
        await _close_incomplete(services, lease, user_id)
        stripe_plan = await stripe_api.ensure_plan(
            services.stripe, services.plans[plan], services.settings.stripe_currency
        )
        async with _attempt(services, lease, user_id, plan, customer) as attempt_id:
            created = await stripe_api.create_subscription(
                services.stripe, customer, user_id, stripe_plan, attempt_id
            )
        status = str(created.get("status"))
        invoice = created.get("latest_invoice")
        intent = None
        if status not in PAID_STATUSES and isinstance(invoice, dict):
            intent = await stripe_api.invoice_intent(services.stripe, invoice)
        async with locks.fenced(services.engine, lease) as conn:
            await _record(conn, user_id, created, plan, intent)
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    log.info(
        "subscribed",
        extra={"user_id": user_id, "plan": plan, "status": status, "subscription": created["id"]},
    )
    view = await _view(services, user_id)
    if status not in PAID_STATUSES:
        raise _first_payment_refused(created, intent)
    return view


async def _paid_or_conflict(services: Services, user_id: str, what: str) -> Row[Any]:
    row = await _paid_row(services, user_id)
    if row is None or row.stripe_subscription_id is None:
        raise ApiError(409, ErrorCode.CONFLICT, f"there is no paid subscription to {what}")
    return row


def _gone() -> ApiError:
    return ApiError(409, ErrorCode.CONFLICT, "the subscription no longer exists in Stripe")


async def change_plan(services: Services, user_id: str, plan: str) -> dict[str, Any]:
    """Switches to `plan`, and keeps a subscription that was set to cancel at the period end
    (asking for the current plan only does that)."""
    async with _lease(services, user_id) as lease:
        row = await _paid_or_conflict(services, user_id, "change; subscribe first")
        if row.plan != plan or row.cancel_at_period_end:
            found = await stripe_api.retrieve_subscription(
                services.stripe, row.stripe_subscription_id
            )
            if found is None:
                raise _gone()
            stripe_plan = None
            if stripe_api.subscription_plan(found) != plan:
                stripe_plan = await stripe_api.ensure_plan(
                    services.stripe, services.plans[plan], services.settings.stripe_currency
                )
            changed = await stripe_api.change_plan(services.stripe, found, stripe_plan)
            async with locks.fenced(services.engine, lease) as conn:
                await records.save_subscription(conn, user_id, changed, now_s())
            log.info(
                "plan changed",
                extra={
                    "user_id": user_id,
                    "from": row.plan,
                    "to": plan,
                    "resumed": bool(found.get("cancel_at_period_end")),
                },
            )
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    return await _view(services, user_id)


async def cancel(services: Services, user_id: str, at_period_end: bool) -> dict[str, Any]:
    async with _lease(services, user_id) as lease:
        row = await _paid_or_conflict(services, user_id, "cancel")
        if at_period_end:
            ended: stripe_api.Obj | None = await stripe_api.cancel_at_period_end(
                services.stripe, row.stripe_subscription_id
            )
        else:
            ended = await stripe_api.cancel_now(services.stripe, row.stripe_subscription_id)
        if ended is None:
            raise _gone()
        async with locks.fenced(services.engine, lease) as conn:
            await records.save_subscription(conn, user_id, ended, now_s())
        log.info("cancelled", extra={"user_id": user_id, "at_period_end": at_period_end})
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    return await _view(services, user_id)
