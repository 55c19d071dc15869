"""Subscribe, change plan, cancel: each one Stripe call sequence under the user's lock, the
result recorded at once (localstripe sends no webhook for a plan change or a scheduled
cancellation, and users expect their quota to follow immediately), then pushed to the quota.
Webhooks that report the same changes later re-read Stripe and write the same rows.
"""

import logging
from datetime import UTC, datetime
from typing import Any

import stripe
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_api import records, stripe_api, views
from billing_api.services import Services
from quota_common.accounts import PAID_STATUSES, plan_period
from quota_common.codes import ApiError, ErrorCode
from quota_common.schema import subscriptions

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


async def _ensure_customer(services: Services, user_id: str) -> str:
    """The user's one Stripe customer, committed before anything is bought with it, so a
    failure later never forgets a customer Stripe already has."""
    async with services.engine.begin() as conn:
        await records.lock_user(conn, user_id)
        await _refuse_if_paid(conn, user_id)
        customer = await records.customer_of(conn, user_id)
        if customer is None:
            customer = await stripe_api.create_customer(services.stripe, user_id)
            await records.save_customer(conn, user_id, customer)
            log.info("stripe customer created", extra={"user_id": user_id})
        return customer


async def _refuse_if_paid(conn: AsyncConnection, user_id: str) -> None:
    row = await records.paid_subscription(conn, user_id)
    if row is not None and not (
        row.cancel_at_period_end and row.current_period_end <= datetime.now(UTC)
    ):
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            f"a {row.plan} subscription is already {row.status}; use /api/change-plan",
        )


async def _close_incomplete(
    services: Services, conn: AsyncConnection, user_id: str, stamp: int
) -> None:
    """A subscription whose first payment failed is replaced by the new one, not left beside
    it to be paid by accident later."""
    for subscription_id in await records.subscription_ids_with_status(
        conn, user_id, ("incomplete",)
    ):
        try:
            closed = await stripe_api.cancel_now(services.stripe, subscription_id)
        except stripe.InvalidRequestError:
            found = await stripe_api.retrieve_subscription(services.stripe, subscription_id)
            if found is None:
                continue
            closed = found
        await records.save_subscription(conn, user_id, closed, stamp)


async def subscribe(
    services: Services, user_id: str, plan: str, payment_method: str | None
) -> dict[str, Any]:
    customer = await _ensure_customer(services, user_id)
    stamp = now_s()
    async with services.engine.begin() as conn:
        await records.lock_user(conn, user_id)
        await _refuse_if_paid(conn, user_id)
        if payment_method is not None:
            await stripe_api.set_payment_method(services.stripe, customer, payment_method)
        await _close_incomplete(services, conn, user_id, stamp)
        stripe_plan = await stripe_api.ensure_plan(
            services.stripe, services.plans[plan], services.settings.stripe_currency
        )
        # Same user, attempt and inputs: the same key, so a retry after a lost answer finds
        # the subscription Stripe already made instead of making a second one.
        attempts = await conn.scalar(select(func.count()).where(subscriptions.c.user_id == user_id))
        attempt = f"{attempts}-{plan}-{payment_method or 'saved'}"
        created = await stripe_api.create_subscription(
            services.stripe, customer, user_id, stripe_plan, attempt
        )
        await records.save_subscription(conn, user_id, created, stamp)
        invoice = created.get("latest_invoice")
        if isinstance(invoice, dict):
            await records.save_invoice(conn, user_id, invoice, plan)
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    status = str(created.get("status"))
    log.info(
        "subscribed",
        extra={"user_id": user_id, "plan": plan, "status": status, "subscription": created["id"]},
    )
    view = await _view(services, user_id)
    if status not in PAID_STATUSES:
        raise ApiError(
            402,
            ErrorCode.PAYMENT_FAILED,
            "the first payment failed; subscribe again with another payment method",
            subscription_id=created["id"],
            subscription_status=status,
        )
    return view


async def _paid_or_conflict(conn: AsyncConnection, user_id: str, what: str) -> Any:
    row = await records.paid_subscription(conn, user_id)
    if row is None or row.stripe_subscription_id is None:
        raise ApiError(409, ErrorCode.CONFLICT, f"there is no paid subscription to {what}")
    return row


async def change_plan(services: Services, user_id: str, plan: str) -> dict[str, Any]:
    async with services.engine.begin() as conn:
        await records.lock_user(conn, user_id)
        row = await _paid_or_conflict(conn, user_id, "change; subscribe first")
        if row.plan != plan:
            found = await stripe_api.retrieve_subscription(
                services.stripe, row.stripe_subscription_id
            )
            if found is None:
                raise ApiError(409, ErrorCode.CONFLICT, "the subscription no longer exists")
            stripe_plan = await stripe_api.ensure_plan(
                services.stripe, services.plans[plan], services.settings.stripe_currency
            )
            changed = await stripe_api.change_plan(services.stripe, found, stripe_plan)
            await records.save_subscription(conn, user_id, changed, now_s())
            log.info("plan changed", extra={"user_id": user_id, "from": row.plan, "to": plan})
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    return await _view(services, user_id)


async def cancel(services: Services, user_id: str, at_period_end: bool) -> dict[str, Any]:
    async with services.engine.begin() as conn:
        await records.lock_user(conn, user_id)
        row = await _paid_or_conflict(conn, user_id, "cancel")
        if at_period_end:
            ended = await stripe_api.cancel_at_period_end(
                services.stripe, row.stripe_subscription_id
            )
        else:
            ended = await stripe_api.cancel_now(services.stripe, row.stripe_subscription_id)
        await records.save_subscription(conn, user_id, ended, now_s())
        log.info("cancelled", extra={"user_id": user_id, "at_period_end": at_period_end})
    await records.push_plan(services.engine, services.redis, user_id, services.plans)
    return await _view(services, user_id)
