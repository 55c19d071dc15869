"""Operator endpoints: reset a user's usage, grant one-off credits. Each writes its audit row
and its effect to Postgres and applies it to Redis in one transaction under the user's lock, so
it survives a Redis flush and two operator changes of one user land in Postgres order.

Periods are decided on Redis' clock, the one the scripts roll periods by, and the scripts check
that Redis is in the period the Postgres rows name. When it is not (a plan change not pushed
yet), Postgres' account is applied to Redis first (lua/apply_plan.lua). When a period boundary
passes during the call, the transaction is rolled back and made again in the new period; after
PERIOD_ATTEMPTS_MAX the operator is told that nothing changed (503), never a 200 for a grant
Redis did not take.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.routing import Route

from quota_common.accounts import Account, load_account
from quota_common.codes import ApiError, Code, ErrorCode
from quota_common.keys import UserKeys, user_keys
from quota_common.redis_client import redis_now
from quota_common.schema import admin_audit, credit_grants, usage_totals
from quota_common.scripts import SCRIPTS, LuaScript
from quota_common.settings import Settings
from sidecar import answers
from sidecar.fields import CREDITS, RESET, check_id, validate
from sidecar.http import Answer, Call, Endpoint
from sidecar.ledger import Ledger

# Transactions tried when period boundaries keep passing during the call (one is rare).
PERIOD_ATTEMPTS_MAX = 3


class PeriodMoved(Exception):
    """Redis is in another period than this transaction's rows: roll back, try again."""


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

    def operator(call: Call) -> UserKeys:
        if token is None:
            raise ApiError(
                404, ErrorCode.NOT_FOUND, "operator endpoints are disabled: ADMIN_TOKEN is not set"
            )
        return user_keys(check_id(call.path_params["user_id"], "user_id"))

    Change = Callable[[AsyncConnection, Account], Awaitable[str]]

    async def in_transaction(user: UserKeys, change: Change) -> Answer:
        """Runs `change` in a transaction holding the user's lock, with the account as Postgres
        records it at Redis' time; `change` returns the script's usage answer."""
        for _ in range(PERIOD_ATTEMPTS_MAX):
            try:
                async with ledger.engine.begin() as conn:
                    await lock_user(conn, user.user_id)
                    now = await redis_now(ledger.redis)
                    account = await load_account(conn, user.user_id, ledger.plans, now)
                    return Answer(answers.usage(user.user_id, await change(conn, account)))
            except PeriodMoved:
                continue
        raise ApiError(
            503,
            ErrorCode.SERVICE_UNAVAILABLE,
            "the user's billing period turned over during the call; nothing was changed, try again",
        )

    async def in_period(user: UserKeys, script: LuaScript, account: Account, *args: Any) -> str:
        """Runs grant.lua or reset.lua for the account's period. Redis in another one is given
        Postgres' account first; a boundary passing meanwhile raises PeriodMoved."""
        period_s = int(account.period_start.timestamp())
        code, answer = await ledger.run_on_state(script, user, *args, period_s)
        if code == Code.OTHER_PERIOD:
            await ledger.call(SCRIPTS["apply_plan"], [user.state], account.script_args())
            code, answer = await ledger.run_on_state(script, user, *args, period_s)
        if code != Code.OK:
            raise PeriodMoved
        return answer

    async def reset(call: Call) -> Answer:
        user = operator(call)
        body = validate(await call.json(), RESET)

        async def change(conn: AsyncConnection, account: Account) -> str:
            period = (usage_totals.c.user_id == user.user_id) & (
                usage_totals.c.period_start == account.period_start
            )
            # Zeroed (and its row locked) before Redis resets: a worker's addition of usage
            # settled meanwhile waits for this commit and then counts what follows the reset.
            await conn.execute(
                pg_insert(usage_totals)
                .values(user_id=user.user_id, period_start=account.period_start, tokens_charged=0)
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
                {"period_start": account.period_start.isoformat()},
            )
            answer = await in_period(user, SCRIPTS["reset"], account)
            usage_answer, entry_id = answer.rsplit("|", 1)
            # The reset's position: no settlement from before it is added to the total later,
            # whichever worker writes it (flush.WRITE_EVENTS), even if Redis loses the entry.
            await conn.execute(
                update(usage_totals)
                .where(period)
                .values(reset_position=func.stream_entry_position(entry_id))
            )
            return usage_answer

        return await in_transaction(user, change)

    async def credits(call: Call) -> Answer:
        user = operator(call)
        body = validate(await call.json(), CREDITS)

        async def change(conn: AsyncConnection, account: Account) -> str:
            await conn.execute(
                insert(credit_grants).values(
                    user_id=user.user_id,
                    tokens=body["tokens"],
                    period_start=account.period_start,
                    reason=body["reason"],
                )
            )
            await audit(
                conn,
                "credits",
                user.user_id,
                body["reason"],
                {"tokens": body["tokens"], "period_start": account.period_start.isoformat()},
            )
            total = await conn.scalar(
                select(func.sum(credit_grants.c.tokens)).where(
                    credit_grants.c.user_id == user.user_id,
                    credit_grants.c.period_start == account.period_start,
                )
            )
            return await in_period(user, SCRIPTS["grant"], account, int(total or 0))

        return await in_transaction(user, change)

    return [
        Route("/admin/v1/users/{user_id}/reset", Endpoint("admin_reset", reset, token=admin)),
        Route("/admin/v1/users/{user_id}/credits", Endpoint("admin_credits", credits, token=admin)),
    ]
