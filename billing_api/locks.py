"""One billing change per user at a time, without holding a Postgres connection while Stripe
answers.

A change (subscribe, change plan, cancel, a webhook) runs under the user's lease: a row of
`billing_leases` taken in one short statement. Everything it writes goes through `fenced`, a
transaction that first checks the lease is still ours (and renews it), so a holder that
outlived its lease can never overwrite what a later holder wrote. Requests of one process
queue on an asyncio lock first, holding nothing while they wait; a lease held by another
process is polled. A holder that crashed is replaced once its lease expires.
"""

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import delete, func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_api.http import RETRY_AFTER_S
from quota_common.codes import ApiError, ErrorCode
from quota_common.schema import billing_leases

# Longer than any one phase can take (each Stripe call times out after 20 s), so a live holder
# never loses its lease; every fenced write renews it.
LEASE = timedelta(seconds=90)
WAIT_S = 10.0
POLL_S = (0.02, 0.05, 0.1, 0.2)
log = logging.getLogger("billing_api")


@dataclass(slots=True)
class Queue:
    """The requests of this process waiting for, or holding, one user's lease."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    user_id: str
    holder: str


def busy() -> ApiError:
    return ApiError(
        409,
        ErrorCode.CONFLICT,
        "another billing change for this user is in progress; try again shortly",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


async def _take(engine: AsyncEngine, lease: Lease) -> bool:
    async with engine.begin() as conn:
        taken = await conn.execute(
            insert(billing_leases)
            .values(user_id=lease.user_id, holder=lease.holder, expires_at=func.now() + LEASE)
            .on_conflict_do_update(
                index_elements=[billing_leases.c.user_id],
                set_={"holder": lease.holder, "expires_at": func.now() + LEASE},
                where=billing_leases.c.expires_at < func.now(),
            )
            .returning(billing_leases.c.holder)
        )
        return taken.first() is not None


async def _give_back(engine: AsyncEngine, lease: Lease) -> None:
    try:
        async with engine.begin() as conn:
            await conn.execute(
                delete(billing_leases).where(
                    billing_leases.c.user_id == lease.user_id,
                    billing_leases.c.holder == lease.holder,
                )
            )
    except (SQLAlchemyError, OSError) as error:
        # It expires on its own; until then this user's changes wait or get 409.
        log.warning("lease not released", extra={"user_id": lease.user_id, "error": repr(error)})


async def _acquire(engine: AsyncEngine, queue: Queue, lease: Lease) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            await queue.lock.acquire()
            try:
                polls = 0
                while not await _take(engine, lease):
                    await asyncio.sleep(POLL_S[min(polls, len(POLL_S) - 1)])
                    polls += 1
            except BaseException:
                queue.lock.release()
                raise
    except TimeoutError:
        raise busy() from None


@asynccontextmanager
async def held(engine: AsyncEngine, queues: dict[str, Queue], user_id: str) -> AsyncIterator[Lease]:
    """The user's lease for the block; 409 `conflict` after WAIT_S of waiting for it."""
    lease = Lease(user_id, secrets.token_hex(16))
    queue = queues.setdefault(user_id, Queue())
    queue.requests += 1
    try:
        await _acquire(engine, queue, lease)
        try:
            yield lease
        finally:
            await _give_back(engine, lease)
            queue.lock.release()
    finally:
        queue.requests -= 1
        if queue.requests == 0:
            del queues[user_id]


@asynccontextmanager
async def fenced(engine: AsyncEngine, lease: Lease) -> AsyncIterator[AsyncConnection]:
    """A transaction that commits only while the lease is still ours, and renews it."""
    async with engine.begin() as conn:
        renewed = await conn.execute(
            update(billing_leases)
            .where(
                billing_leases.c.user_id == lease.user_id,
                billing_leases.c.holder == lease.holder,
                billing_leases.c.expires_at > func.now(),
            )
            .values(expires_at=func.now() + LEASE)
            .returning(billing_leases.c.holder)
        )
        if renewed.first() is None:
            log.warning("lease lost", extra={"user_id": lease.user_id})
            raise ApiError(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                "the change took too long and was not recorded; try again",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        yield conn
