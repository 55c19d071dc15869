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

A subscription that gives no plan now but could become paid again (incomplete, paused, unpaid)
is re-read in Stripe before a new one is bought: paid by now, it is recorded and the subscribe
refused; still dormant, it is ended first. So the user never pays for two.
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
from billing_api.http import RETRY_AFTER_S, retry_after
from billing_api.services import Services
from quota_common.accounts import PAID_STATUSES, plan_period
from quota_common.codes import ApiError, ErrorCode

# Stripe may still make an attempt's subscription until our create call has ended (CALL_S after
# the attempt started, at most) and Stripe is done with the request (STRIPE_REQUEST_MAX_S more):
# an attempt Stripe shows no subscription for is taken as abandoned only after both.
ATTEMPT_SETTLE = timedelta(seconds=stripe_api.CALL_S + stripe_api.STRIPE_REQUEST_MAX_S + 20)
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
    payment: stripe_api.Payment,
    plan: str | None = None,
) -> None:
    """A subscription Stripe made for us, with its latest invoice when Stripe returned it."""
    await records.save_subscription(conn, user_id, subscription, now_s())
    invoice = subscription.get("latest_invoice")
    if isinstance(invoice, dict):
        plan = plan or stripe_api.subscription_plan(subscription)
        await records.save_invoice(conn, user_id, invoice, payment, plan)


async def _payment(services: Services, subscription: stripe_api.Obj) -> stripe_api.Payment:
    """How the subscription's latest invoice is being paid, read from Stripe."""
    invoice = subscription.get("latest_invoice")
    if not isinstance(invoice, dict):
        return stripe_api.Payment()
    return await stripe_api.invoice_payment(services.stripe, invoice)


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
            503,
            ErrorCode.SERVICE_UNAVAILABLE,
            "the previous subscribe may still be under way at Stripe; try again after Retry-After",
            retry_after((ATTEMPT_SETTLE - attempt.age).total_seconds()),
        )
    payment = await _payment(services, made) if made else stripe_api.Payment()
    async with locks.fenced(services.engine, lease) as conn:
        if made is None:
            await records.finish_attempt(conn, user_id, attempt.id, None)
        else:
            await _record(conn, user_id, made, payment, attempt.plan)
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


async def _end_dormant(services: Services, lease: locks.Lease, user_id: str) -> None:
    """Re-reads in Stripe the subscriptions recorded as dormant (stripe_api.DORMANT_STATUSES)
    and records what it holds: one paid by now (3-D Secure completed, the unpaid invoice paid)
    then refuses the subscribe in _refuse_if_paid; one still dormant is ended first, so it is
    not left beside the new one to be paid by accident later."""
    async with services.engine.connect() as conn:
        dormant = await records.subscription_ids_with_status(
            conn, user_id, stripe_api.DORMANT_STATUSES
        )
    for subscription_id in dormant:
        found = await stripe_api.retrieve_subscription(services.stripe, subscription_id)
        if found is not None and found.get("status") in stripe_api.DORMANT_STATUSES:
            await stripe_api.end_dormant(services.stripe, found)
            found = await stripe_api.retrieve_subscription(services.stripe, subscription_id)
        if found is None:
            continue
        payment = await _payment(services, found)
        async with locks.fenced(services.engine, lease) as conn:
            await _record(conn, user_id, found, payment)
        if found.get("status") in stripe_api.DORMANT_STATUSES:
            # Stripe refused the void without the invoice being paid: its payment is still
            # being processed by the bank, and either outcome is near.
            raise ApiError(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                "the payment of your previous subscribe is still being processed; try again "
                "shortly",
                retry_after(RETRY_AFTER_S),
            )


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
        await _end_dormant(services, lease, user_id)
        await _refuse_if_paid(services, user_id)
        customer = await _customer(services, lease, user_id)
        if payment_method is not None:
            await stripe_api.set_payment_method(services.stripe, customer, payment_method)
        stripe_plan = await stripe_api.ensure_plan(
            services.stripe, services.plans[plan], services.settings.stripe_currency
        )
        async with _attempt(services, lease, user_id, plan, customer) as attempt_id:
            created = await stripe_api.create_subscription(
                services.stripe, customer, user_id, stripe_plan, attempt_id
            )
        status = str(created.get("status"))
        payment = await _payment(services, created)
        async with locks.fenced(services.engine, lease) as conn:
            await _record(conn, user_id, created, payment, plan)
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    log.info(
        "subscribed",
        extra={"user_id": user_id, "plan": plan, "status": status, "subscription": created["id"]},
    )
    view = await _view(services, user_id)
    if status not in PAID_STATUSES:
        raise _first_payment_refused(created, payment.intent)
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
