"""The JSON shapes of subscriptions and payments, from their Postgres rows."""

from datetime import datetime
from typing import Any

from sqlalchemy import Row

from quota_common.periods import rfc3339
from quota_common.plans import FREE


def subscription(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.stripe_subscription_id,
        "plan": row.plan,
        "status": row.status,
        "current_period_start": rfc3339(row.current_period_start),
        "current_period_end": rfc3339(row.current_period_end),
        "cancel_at_period_end": row.cancel_at_period_end,
    }


def free(start: datetime, end: datetime) -> dict[str, Any]:
    return {
        "id": None,
        "plan": FREE,
        "status": "free",
        "current_period_start": rfc3339(start),
        "current_period_end": rfc3339(end),
        "cancel_at_period_end": False,
    }


def payment(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.stripe_invoice_id,
        "status": row.status,
        "amount": row.amount_cents,
        "amount_refunded": row.amount_refunded_cents,
        "currency": row.currency,
        "plan": row.plan,
        "subscription_id": row.stripe_subscription_id,
        "created_at": rfc3339(row.created_at),
        "hosted_invoice_url": row.hosted_invoice_url,
        "invoice_pdf": row.invoice_pdf,
    }
