"""One billing change per user at a time, without holding a Postgres connection while Stripe
answers.

A change (subscribe, change plan, cancel, a webhook) runs under the user's lease: a row of
`billing_leases` taken in one short statement. While the change runs, its holder renews the
lease every third of its duration, so a live holder keeps it however many Stripe calls it
makes (each capped at stripe_api.CALL_S); only a holder that crashed, or stalled for a whole
lease, loses it, and is replaced once it expires. Everything a change writes goes through
`fenced`, a transaction that first checks the lease is still ours (and renews it), so a holder
that outlived its lease can never overwrite what a later holder wrote. Requests of one process
queue on an asyncio lock first, holding nothing while they wait; a lease held by another
process is polled.
"""

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_api.http import RETRY_AFTER_S, retry_after
from quota_common.codes import ApiError, ErrorCode
from quota_common.schema import billing_leases

LEASE = timedelta(seconds=30)
# How long a request waits for a lease held by someone else before it is told to come back.
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
    duration: timedelta = LEASE


async def _busy(engine: AsyncEngine, user_id: str) -> ApiError:
    """503 with the time the lease in the way has left: by then its holder has finished, or
    renewed it while still at work, or it has expired (a crashed holder)."""
    try:
        async with engine.connect() as conn:
            left = await conn.scalar(
                select(func.extract("epoch", billing_leases.c.expires_at - func.now())).where(
                    billing_leases.c.user_id == user_id
                )
            )
    except (SQLAlchemyError, OSError):
        left = None
    return ApiError(
        503,
        ErrorCode.SERVICE_UNAVAILABLE,
        "another billing change for this user is in progress; try again after Retry-After",
        retry_after(float(left) if left is not None else RETRY_AFTER_S),
    )


async def _take(engine: AsyncEngine, lease: Lease) -> bool:
    async with engine.begin() as conn:
        taken = await conn.execute(
            insert(billing_leases)
            .values(
                user_id=lease.user_id, holder=lease.holder, expires_at=func.now() + lease.duration
            )
            .on_conflict_do_update(
                index_elements=[billing_leases.c.user_id],
                set_={"holder": lease.holder, "expires_at": func.now() + lease.duration},
                where=billing_leases.c.expires_at < func.now(),
            )
            .returning(billing_leases.c.holder)
        )
        return taken.first() is not None


async def _renewed(conn: AsyncConnection, lease: Lease) -> bool:
    """Moves the lease's expiry on, if it is still ours and has not expired."""
    renewed = await conn.execute(
        update(billing_leases)
        .where(
            billing_leases.c.user_id == lease.user_id,
            billing_leases.c.holder == lease.holder,
            billing_leases.c.expires_at > func.now(),
        )
        .values(expires_at=func.now() + lease.duration)
        .returning(billing_leases.c.holder)
    )
    return renewed.first() is not None


async def _keep(engine: AsyncEngine, lease: Lease) -> None:
    """Renews the lease while its holder works, until it is lost."""
    while True:
        await asyncio.sleep(lease.duration.total_seconds() / 3)
        try:
            async with engine.begin() as conn:
                if not await _renewed(conn, lease):
                    return
        except (SQLAlchemyError, OSError) as error:
            # Two more tries before it expires; the holder's next write will know.
            log.warning("lease not renewed", extra={"user_id": lease.user_id, "error": repr(error)})


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
        # It expires on its own; until then this user's changes wait or get 503.
        log.warning("lease not released", extra={"user_id": lease.user_id, "error": repr(error)})


async def _acquire(engine: AsyncEngine, queue: Queue, lease: Lease, wait_s: float) -> None:
    try:
        async with asyncio.timeout(wait_s):
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
        raise await _busy(engine, lease.user_id) from None


@asynccontextmanager
async def held(
    engine: AsyncEngine,
    queues: dict[str, Queue],
    user_id: str,
    duration: timedelta = LEASE,
    wait_s: float = WAIT_S,
) -> AsyncIterator[Lease]:
    """The user's lease for the block, renewed while it runs; 503 `service_unavailable` with
    Retry-After after `wait_s` of waiting for it."""
    lease = Lease(user_id, secrets.token_hex(16), duration)
    queue = queues.setdefault(user_id, Queue())
    queue.requests += 1
    try:
        await _acquire(engine, queue, lease, wait_s)
        keeper = asyncio.create_task(_keep(engine, lease))
        try:
            yield lease
        finally:
            # Not awaited: a renewal still in flight finds the row gone or not ours.
            keeper.cancel()
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
        if not await _renewed(conn, lease):
            log.warning("lease lost", extra={"user_id": lease.user_id})
            raise ApiError(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                "the change took too long and was not recorded; try again",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        yield conn
