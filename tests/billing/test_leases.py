"""The per-user lease (billing_api.locks) on real Postgres: a live holder keeps it past its
duration, a crashed holder's lease is taken over once it expires (and not before: 503 with the
time it has left), and a holder that outlived its lease can write nothing. Each `queues` dict
stands for one billing process."""

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_api import locks
from quota_common.codes import ApiError
from quota_common.schema import billing_leases

SHORT = timedelta(seconds=1)


async def holder_of(pg: AsyncEngine, user_id: str) -> str | None:
    async with pg.connect() as conn:
        found = await conn.scalar(
            select(billing_leases.c.holder).where(billing_leases.c.user_id == user_id)
        )
    return str(found) if found else None


async def crashed_holder(pg: AsyncEngine, user_id: str, expires_in_s: float) -> None:
    """A lease row as a process killed while holding it leaves it."""
    async with pg.begin() as conn:
        await conn.execute(
            insert(billing_leases).values(
                user_id=user_id,
                holder="crashed",
                expires_at=text(f"now() + interval '{expires_in_s} seconds'"),
            )
        )


async def test_a_live_holder_keeps_its_lease_however_long_it_works(pg: AsyncEngine) -> None:
    async with locks.held(pg, {}, "lease-1", duration=SHORT) as lease:
        # Two lease durations of waiting: without renewals the lease would have expired.
        with pytest.raises(ApiError) as refused:
            async with locks.held(pg, {}, "lease-1", wait_s=2 * SHORT.total_seconds()):
                pass
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "1"}
        assert await holder_of(pg, "lease-1") == lease.holder
        async with locks.fenced(pg, lease) as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert await holder_of(pg, "lease-1") is None


async def test_a_crashed_holders_lease_is_taken_over_once_it_expires(pg: AsyncEngine) -> None:
    await crashed_holder(pg, "lease-2", 25)
    with pytest.raises(ApiError) as refused:
        async with locks.held(pg, {}, "lease-2", wait_s=0.2):
            pass
    assert refused.value.status == 503 and refused.value.code == "service_unavailable"
    # The time the lease in the way has left, not a fixed guess.
    assert refused.value.headers is not None
    assert 23 <= int(refused.value.headers["Retry-After"]) <= 25

    async with pg.begin() as conn:
        await conn.execute(
            update(billing_leases)
            .where(billing_leases.c.user_id == "lease-2")
            .values(expires_at=text("now() + interval '0.3 seconds'"))
        )
    async with locks.held(pg, {}, "lease-2", wait_s=5) as lease:
        assert await holder_of(pg, "lease-2") == lease.holder
        async with pg.connect() as conn:
            expires_in = await conn.scalar(
                select(billing_leases.c.expires_at - text("now()")).where(
                    billing_leases.c.user_id == "lease-2"
                )
            )
        assert expires_in is not None and expires_in > timedelta(seconds=20)


async def test_a_holder_that_outlived_its_lease_can_write_nothing(pg: AsyncEngine) -> None:
    taken_over = asyncio.Event()
    done = asyncio.Event()

    async def next_holder() -> None:
        async with locks.held(pg, {}, "lease-3", wait_s=5) as lease:
            async with locks.fenced(pg, lease):
                pass
            taken_over.set()
            await done.wait()
            # The stale holder's release and renewals did not touch this lease.
            assert await holder_of(pg, "lease-3") == lease.holder

    async with locks.held(pg, {}, "lease-3") as stale:
        # As if this holder had stalled (a paused process) for longer than its lease.
        async with pg.begin() as conn:
            await conn.execute(
                update(billing_leases)
                .where(billing_leases.c.user_id == "lease-3")
                .values(expires_at=text("now() - interval '1 second'"))
            )
        other = asyncio.create_task(next_holder())
        await asyncio.wait_for(taken_over.wait(), 5)
        with pytest.raises(ApiError) as refused:
            async with locks.fenced(pg, stale):
                pass
        assert refused.value.status == 503
    done.set()
    await other
    assert await holder_of(pg, "lease-3") is None
