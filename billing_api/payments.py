"""Payment history: one row per Stripe invoice, newest first, paged by invoice id."""

from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_api import views
from quota_common.codes import invalid
from quota_common.schema import payments


async def page(
    conn: AsyncConnection, user_id: str, limit: int, starting_after: str | None
) -> dict[str, Any]:
    query = select(payments).where(payments.c.user_id == user_id)
    if starting_after is not None:
        anchor = (
            await conn.execute(
                select(payments.c.created_at, payments.c.id).where(
                    payments.c.user_id == user_id, payments.c.stripe_invoice_id == starting_after
                )
            )
        ).first()
        if anchor is None:
            raise invalid("starting_after is not one of your payments")
        query = query.where(
            or_(
                payments.c.created_at < anchor.created_at,
                and_(payments.c.created_at == anchor.created_at, payments.c.id < anchor.id),
            )
        )
    rows = (
        await conn.execute(
            query.order_by(payments.c.created_at.desc(), payments.c.id.desc()).limit(limit + 1)
        )
    ).all()
    return {
        "ok": True,
        "payments": [views.payment(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }
