"""Operator endpoints: reset a user's usage, grant one-off credits. Each writes its audit row
and its effect to Postgres first (so it survives a Redis flush) and then applies it to Redis."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.routing import Route

from quota_common.accounts import plan_period
from quota_common.codes import ApiError, ErrorCode
from quota_common.keys import UserKeys, user_keys
from quota_common.schema import admin_audit, credit_grants, usage_totals
from quota_common.scripts import SCRIPTS
from quota_common.settings import Settings
from sidecar import answers
from sidecar.fields import CREDITS, RESET, check_id, validate
from sidecar.http import Answer, Call, Endpoint
from sidecar.ledger import Ledger


async def lock_user(conn: AsyncConnection, user_id: str) -> None:
    """Serialises operator changes of one user, so their Redis effects land in Postgres order."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:u))"), {"u": user_id})


async def audit(
    conn: AsyncConnection, action: str, user_id: str, reason: str, details: dict[str, Any]
) -> None:
    await conn.execute(
        insert(admin_audit).values(action=action, user_id=user_id, reason=reason, details=details)
    )


def admin_routes(settings: Settings, ledger: Ledger) -> list[Route]:
    token = settings.admin_token

    def admin() -> str | None:
        return token

    def operator(call: Call) -> tuple[UserKeys, datetime]:
        if token is None:
            raise ApiError(
                404, ErrorCode.NOT_FOUND, "operator endpoints are disabled: ADMIN_TOKEN is not set"
            )
        return user_keys(check_id(call.path_params["user_id"], "user_id")), datetime.now(UTC)

    async def reset(call: Call) -> Answer:
        user, now = operator(call)
        body = validate(await call.json(), RESET)
        async with ledger.engine.begin() as conn:
            await lock_user(conn, user.user_id)
            _, period_start, _, _ = await plan_period(conn, user.user_id, ledger.plans, now)
            await conn.execute(
                pg_insert(usage_totals)
                .values(user_id=user.user_id, period_start=period_start, tokens_charged=0)
                .on_conflict_do_update(
                    index_elements=["user_id", "period_start"],
                    set_={"tokens_charged": 0, "updated_at": func.now()},
                )
            )
            await audit(
                conn,
                "reset",
                user.user_id,
                body["reason"],
                {"period_start": period_start.isoformat()},
            )
            # Run inside the transaction, so its lock orders the Redis effects; a user Redis does
            # not know is seeded first and then reset, like any other call.
            _, usage_answer = await ledger.run_on_state(SCRIPTS["reset"], user)
        return Answer(answers.usage(user.user_id, usage_answer))

    async def credits(call: Call) -> Answer:
        user, now = operator(call)
        body = validate(await call.json(), CREDITS)
        async with ledger.engine.begin() as conn:
            await lock_user(conn, user.user_id)
            _, period_start, _, _ = await plan_period(conn, user.user_id, ledger.plans, now)
            await conn.execute(
                insert(credit_grants).values(
                    user_id=user.user_id,
                    tokens=body["tokens"],
                    period_start=period_start,
                    reason=body["reason"],
                )
            )
            await audit(
                conn,
                "credits",
                user.user_id,
                body["reason"],
                {"tokens": body["tokens"], "period_start": period_start.isoformat()},
            )
            total = await conn.scalar(
                select(func.sum(credit_grants.c.tokens)).where(
                    credit_grants.c.user_id == user.user_id,
                    credit_grants.c.period_start == period_start,
                )
            )
            _, usage_answer = await ledger.run_on_state(
                SCRIPTS["grant"], user, int(total or 0), int(period_start.timestamp())
            )
        return Answer(answers.usage(user.user_id, usage_answer))

    return [
        Route("/admin/v1/users/{user_id}/reset", Endpoint("admin_reset", reset, token=admin)),
        Route("/admin/v1/users/{user_id}/credits", Endpoint("admin_credits", credits, token=admin)),
    ]
