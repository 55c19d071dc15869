"""What the billing API writes to Postgres: customers, subscribe attempts, subscriptions,
payments and processed Stripe events, and the hand-over of a changed plan to the quota (NOTIFY
for the sync worker, and a direct push into Redis).

Every change to one user's billing is made under that user's lease (billing_api.locks), whose
fenced transactions do the writing: API calls and webhooks for a user are serialised, so a
Stripe answer fetched earlier can never overwrite one fetched later, and two subscribes cannot
both pass the "no paid subscription yet" check.
"""

import logging
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import Row, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_api import metrics
from billing_api.stripe_api import (
    Obj,
    Payment,
    attempt_of,
    invoice_plan,
    invoice_subscription,
    subscription_period,
    subscription_plan,
)
from quota_common.accounts import PAID_STATUSES, push_account
from quota_common.plans import Plan
from quota_common.schema import (
    customers,
    payments,
    stripe_events,
    subscribe_attempts,
    subscriptions,
)
from quota_common.scripts import AnyRedis

# First key of the two-key advisory locks of the billing API (the second is the user's hash).
LOCK_NAMESPACE = 7300132
# Stored when a subscription's item is not one of our plans: load_account treats it as FREE.
UNKNOWN_PLAN = "UNKNOWN"
# PaymentIntent statuses of a payment that has not failed but waits for the card holder.
AWAITING_CUSTOMER = ("requires_action", "requires_confirmation", "processing")
log = logging.getLogger("billing_api")


def from_unix(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def lock_user(conn: AsyncConnection, user_id: str) -> None:
    """Serialises the pushes of one user's plan into Redis (a short transaction each)."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(:namespace, hashtext(:user_id))"),
        {"namespace": LOCK_NAMESPACE, "user_id": user_id},
    )


async def customer_of(conn: AsyncConnection, user_id: str) -> str | None:
    found = await conn.scalar(
        select(customers.c.stripe_customer_id).where(customers.c.user_id == user_id)
    )
    return str(found) if found else None


async def user_of_customer(conn: AsyncConnection, stripe_customer_id: str) -> str | None:
    found = await conn.scalar(
        select(customers.c.user_id).where(customers.c.stripe_customer_id == stripe_customer_id)
    )
    return str(found) if found else None


async def save_customer(conn: AsyncConnection, user_id: str, stripe_customer_id: str) -> None:
    await conn.execute(
        insert(customers)
        .values(user_id=user_id, stripe_customer_id=stripe_customer_id)
        .on_conflict_do_nothing()
    )


async def save_subscription(
    conn: AsyncConnection, user_id: str, subscription: Obj, stripe_updated_at: int
) -> None:
    """Records the subscription as Stripe returned it and tells the quota about it."""
    start, end = subscription_period(subscription)
    now = int(datetime.now(UTC).timestamp())
    values: dict[str, Any] = {
        "plan": subscription_plan(subscription) or UNKNOWN_PLAN,
        "status": str(subscription.get("status") or "incomplete")[:32],
        "current_period_start": from_unix(start or now),
        "current_period_end": from_unix(end or now),
        "cancel_at_period_end": bool(subscription.get("cancel_at_period_end")),
        "updated_at": func.now(),
    }
    statement = insert(subscriptions).values(
        user_id=user_id,
        stripe_subscription_id=subscription["id"],
        stripe_updated_at=stripe_updated_at,
        **values,
    )
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[subscriptions.c.stripe_subscription_id],
            set_={
                **values,
                "stripe_updated_at": func.greatest(
                    subscriptions.c.stripe_updated_at, stripe_updated_at
                ),
            },
        )
    )
    attempt_id = attempt_of(subscription)
    if attempt_id is not None:
        await finish_attempt(conn, user_id, attempt_id, subscription["id"])


async def open_attempt(conn: AsyncConnection, user_id: str) -> Row[Any] | None:
    """The user's subscribe attempt whose outcome is not recorded yet, with its `age`."""
    age = (func.now() - subscribe_attempts.c.created_at).label("age")
    return (
        await conn.execute(
            select(subscribe_attempts, age).where(
                subscribe_attempts.c.user_id == user_id, subscribe_attempts.c.finished_at.is_(None)
            )
        )
    ).first()


async def start_attempt(
    conn: AsyncConnection, user_id: str, plan: str, stripe_customer_id: str
) -> int:
    """A new open attempt (the unique index refuses a second open one for the user)."""
    attempt_id = await conn.scalar(
        insert(subscribe_attempts)
        .values(user_id=user_id, plan=plan, stripe_customer_id=stripe_customer_id)
        .returning(subscribe_attempts.c.id)
    )
    return int(attempt_id or 0)


async def finish_attempt(
    conn: AsyncConnection, user_id: str, attempt_id: int, subscription_id: str | None
) -> None:
    """Closes an attempt with the subscription it made (None: Stripe made none)."""
    of_attempt = (subscribe_attempts.c.id == attempt_id, subscribe_attempts.c.user_id == user_id)
    closed = await conn.execute(
        update(subscribe_attempts)
        .where(*of_attempt, subscribe_attempts.c.finished_at.is_(None))
        .values(finished_at=func.now(), stripe_subscription_id=subscription_id)
        .returning(subscribe_attempts.c.id)
    )
    if subscription_id is None or closed.first() is not None:
        return
    # Closed before as "Stripe made none": Stripe made it after all, later than ATTEMPT_SETTLE
    # allows for (a holder stalled between committing the attempt and sending the create). The
    # user may now pay for two subscriptions: an operator must look. Flagged once.
    late = await conn.execute(
        update(subscribe_attempts)
        .where(
            *of_attempt,
            subscribe_attempts.c.finished_at.is_not(None),
            subscribe_attempts.c.stripe_subscription_id.is_(None),
        )
        .values(stripe_subscription_id=subscription_id)
        .returning(subscribe_attempts.c.id)
    )
    if late.first() is not None:
        metrics.SUBSCRIBE_RECOVERIES.labels("found_after_abandoned").inc()
        log.error(
            "subscription made for an attempt closed as abandoned; the user may have two",
            extra={"user_id": user_id, "attempt": attempt_id, "subscription": subscription_id},
        )


async def paid_subscription(conn: AsyncConnection, user_id: str) -> Row[Any] | None:
    """The subscription that gives the user a paid plan, chosen as load_account chooses it."""
    return (
        await conn.execute(
            select(subscriptions)
            .where(subscriptions.c.user_id == user_id, subscriptions.c.status.in_(PAID_STATUSES))
            .order_by(subscriptions.c.updated_at.desc(), subscriptions.c.id.desc())
            .limit(1)
        )
    ).first()


async def subscription_ids_with_status(
    conn: AsyncConnection, user_id: str, statuses: tuple[str, ...]
) -> list[str]:
    rows = await conn.scalars(
        select(subscriptions.c.stripe_subscription_id).where(
            subscriptions.c.user_id == user_id, subscriptions.c.status.in_(statuses)
        )
    )
    return [str(row) for row in rows if row]


def payment_status(invoice: Obj, payment: Payment) -> str:
    """Ours from what Stripe holds now: a paid invoice is succeeded, or refunded once its charge
    is all refunded; an attempted open invoice is failed, unless its PaymentIntent waits for the
    card holder (3-D Secure) or the bank: then it is pending, like one not attempted yet."""
    status = invoice.get("status")
    if status == "paid":
        return "refunded" if (payment.charge or {}).get("refunded") else "succeeded"
    if status in ("void", "uncollectible"):
        return "failed"
    waiting = payment.intent is not None and payment.intent.get("status") in AWAITING_CUSTOMER
    if (
        status == "open"
        and not waiting
        and (invoice.get("attempted") or invoice.get("attempt_count"))
    ):
        return "failed"
    return "pending"


async def save_invoice(
    conn: AsyncConnection, user_id: str, invoice: Obj, payment: Payment, plan: str | None = None
) -> None:
    """Records the invoice and its payment as Stripe holds them now, whatever was recorded
    before: every writer read Stripe under the user's lease, so the last write is the latest
    state, a refund learnt before its invoice included."""
    status = payment_status(invoice, payment)
    paid = invoice.get("status") == "paid"
    amount = invoice.get("amount_paid") if paid else invoice.get("amount_due")
    values: dict[str, Any] = {
        "stripe_subscription_id": invoice_subscription(invoice),
        "amount_cents": int(amount or 0),
        "amount_refunded_cents": int((payment.charge or {}).get("amount_refunded") or 0),
        "currency": str(invoice.get("currency") or "usd")[:3],
        "status": status,
        "plan": invoice_plan(invoice) or plan,
        "hosted_invoice_url": invoice.get("hosted_invoice_url"),
        "invoice_pdf": invoice.get("invoice_pdf"),
    }
    created = invoice.get("created")
    statement = insert(payments).values(
        user_id=user_id,
        stripe_invoice_id=invoice["id"],
        created_at=from_unix(int(created)) if created else func.now(),
        **values,
    )
    await conn.execute(
        statement.on_conflict_do_update(index_elements=[payments.c.stripe_invoice_id], set_=values)
    )


async def event_seen(conn: AsyncConnection, event_id: str) -> bool:
    found = await conn.scalar(
        select(stripe_events.c.event_id).where(stripe_events.c.event_id == event_id)
    )
    return found is not None


async def record_event(conn: AsyncConnection, event_id: str, event_type: str) -> bool:
    """True the first time an event id is seen. In the transaction that applies the event, so
    an event whose handling failed is not remembered and Stripe's retry applies it."""
    inserted = await conn.execute(
        insert(stripe_events)
        .values(event_id=event_id, type=event_type[:128])
        .on_conflict_do_nothing()
        .returning(stripe_events.c.event_id)
    )
    return inserted.first() is not None


# lua/apply_plan.lua's answers, as the plan push metric names them.
PUSH_OUTCOMES = {1: "applied", 0: "not_loaded", 2: "period_moved"}


async def push_plan(
    engine: AsyncEngine, redis: AnyRedis, user_id: str, plans: dict[str, Plan]
) -> None:
    """Puts the plan Postgres now records into Redis, after the change committed. Under the
    user's lock, so the last push reads the last committed state. A failure only delays the
    change: the sync worker applies it on NOTIFY, and a user Redis lacks is seeded from
    Postgres."""
    try:
        async with engine.begin() as conn:
            await lock_user(conn, user_id)
            outcome = await push_account(redis, conn, user_id, plans)
        metrics.PLAN_PUSHES.labels(PUSH_OUTCOMES.get(outcome, "not_loaded")).inc()
    except (RedisError, OSError, TimeoutError, SQLAlchemyError) as error:
        metrics.PLAN_PUSHES.labels("failed").inc()
        log.warning("plan push failed", extra={"user_id": user_id, "error": repr(error)})
