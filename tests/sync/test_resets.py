"""Operator resets against settlements from before them that reach Postgres late: a second
worker, a worker killed and its entries claimed after the restart, Redis flushed before the
reset entry was processed, a reset committed while a batch is being written, and a settlement
in the same millisecond as the reset. The total, Redis `used` and the drift repair all keep
the reset."""

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import keys
from quota_common.periods import calendar_month
from sync_worker import metrics
from sync_worker.drift import DriftRepair
from sync_worker.flush import stream_position
from sync_worker.worker import Worker
from tests.api import commit, usage
from tests.servers import Process, eventually
from tests.sync.conftest import MakeWorker, drain, scalar, start_worker
from tests.sync.helpers import (
    end_dead_workers_transactions,
    pending,
    worker_blocked,
    writes_blocked,
)

ADMIN = {"Authorization": "Bearer test-admin-token"}
# Claims only when a test asks for them.
NO_CLAIMS = "600000"


async def reset(http: httpx.AsyncClient, user_id: str) -> None:
    answer = await http.post(
        f"/admin/v1/users/{user_id}/reset", json={"reason": "test"}, headers=ADMIN
    )
    assert answer.status_code == 200, answer.text


async def total(pg: AsyncEngine, user_id: str) -> int:
    return int(
        await scalar(pg, "SELECT tokens_charged FROM usage_totals WHERE user_id = :u", u=user_id)
    )


async def assert_reset_kept(
    http: httpx.AsyncClient, pg: AsyncEngine, redis: Redis, user_id: str, after: int
) -> None:
    """Postgres and Redis both count only what came after the reset, and the drift repair
    (its stream caught up now) finds nothing to raise and nothing above."""
    assert await total(pg, user_id) == after
    assert (await usage(http, user_id))["used"] == after
    assert await DriftRepair(redis, pg, 86_400).run_once() == 0
    assert (await usage(http, user_id))["used"] == after
    assert metrics.DRIFT.labels("above")._value.get() == 0
    await redis.flushdb()  # the state rebuilt from Postgres agrees
    assert (await usage(http, user_id))["used"] == after


async def test_pre_reset_usage_written_by_a_slower_worker_is_not_counted(
    http: httpx.AsyncClient, pg: AsyncEngine, redis: Redis, make_worker: MakeWorker
) -> None:
    slow = await make_worker(SYNC_CLAIM_IDLE_MS=NO_CLAIMS)
    fast = await make_worker(SYNC_CLAIM_IDLE_MS=NO_CLAIMS)
    assert (await commit(http, "rs", "pre-1", 70_000))[0] == 200
    held = await slow.settler_of("rs").read()  # the slow worker holds the pre-reset commit
    assert held is not None and len(held.entries) == 1
    await reset(http, "rs")
    assert (await commit(http, "rs", "post-1", 500))[0] == 200
    assert await drain(fast) == 2  # the reset and post-1, written first
    await slow.settler_of("rs").write(held)
    await slow.streams.ack(held.entries)
    assert await scalar(pg, "SELECT count(*) FROM usage_events WHERE user_id = 'rs'") == 2
    await assert_reset_kept(http, pg, redis, "rs", 500)


@pytest.mark.slow
async def test_pre_reset_usage_claimed_after_a_kill_9_and_restart_is_not_counted(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    redis: Redis,
    base_env: dict[str, str],
    logs_dir: Path,
    processes: list[Process],
) -> None:
    first = start_worker(base_env, logs_dir)
    processes.append(first)
    async with writes_blocked(pg):
        assert (await commit(http, "rk", "pre", 60_000))[0] == 200
        await eventually(lambda: worker_blocked(pg, redis), 10, "pre in the worker's hand")
        first.kill()
    await end_dead_workers_transactions(pg)
    await reset(http, "rk")
    assert (await commit(http, "rk", "post", 300))[0] == 200
    # The restarted worker reads the reset and post first; `pre` is still pending with the
    # dead consumer and is claimed once idle for SYNC_CLAIM_IDLE_MS.
    processes.append(start_worker(base_env, logs_dir, SYNC_CLAIM_IDLE_MS="3000"))

    async def all_written() -> bool:
        count = await scalar(pg, "SELECT count(*) FROM usage_events WHERE user_id = 'rk'")
        return bool(count == 2 and await pending(redis) == 0)

    await eventually(all_written, 20, "pre claimed and written")
    later = await scalar(
        pg,
        "SELECT (SELECT recorded_at FROM usage_events WHERE reservation_id = 'pre')"
        " > (SELECT recorded_at FROM usage_events WHERE reservation_id = 'post')",
    )
    assert later, "pre was not written after the reset's batch: the case was not exercised"
    await assert_reset_kept(http, pg, redis, "rk", 300)


async def test_flush_before_the_reset_entry_was_processed_keeps_the_reset(
    http: httpx.AsyncClient, pg: AsyncEngine, redis: Redis, make_worker: MakeWorker
) -> None:
    slow = await make_worker(SYNC_CLAIM_IDLE_MS=NO_CLAIMS)
    assert (await commit(http, "rf", "pre", 40_000))[0] == 200
    held = await slow.settler_of("rf").read()
    assert held is not None
    await reset(http, "rf")
    await redis.flushdb()  # the reset entry goes with it; Postgres has the reset already
    await slow.settler_of("rf").write(held)
    assert await total(pg, "rf") == 0
    assert (await usage(http, "rf"))["used"] == 0


async def test_reset_committed_while_a_batch_is_written_counts_only_what_follows_it(
    pg: AsyncEngine, redis: Redis, worker: Worker
) -> None:
    """The batch's statement read the total before the reset (another worker's, or the
    operator's) committed, and adds only the events after the reset's position."""
    period_s = int(calendar_month(datetime.now(UTC))[0].timestamp())
    stream = keys.user_keys("rc").stream
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    await settle_entry(redis, stream, f"{now_ms}-0", "rc", "old", 1000, period_s)
    await drain(worker)
    await settle_entry(redis, stream, f"{now_ms + 10}-0", "rc", "pre", 70, period_s)
    await settle_entry(redis, stream, f"{now_ms + 30}-0", "rc", "post", 5, period_s)
    held = await worker.settler_of("rc").read()
    assert held is not None
    async with pg.connect() as other:
        await other.execute(
            text("SELECT 1 FROM usage_totals WHERE user_id = 'rc' FOR UPDATE")
        )  # the other writer holds the total
        writing = asyncio.create_task(worker.settler_of("rc").write(held))
        await eventually(lambda: worker_blocked(pg, redis), 10, "the batch waiting on the total")
        await other.execute(
            text(
                "UPDATE usage_totals SET tokens_charged = 0,"
                " reset_position = stream_entry_position(:reset) WHERE user_id = 'rc'"
            ),
            {"reset": f"{now_ms + 20}-0"},
        )
        await other.commit()
    await writing
    assert await total(pg, "rc") == 5


async def test_settlement_in_the_reset_millisecond_is_ordered_by_stream_position(
    pg: AsyncEngine, redis: Redis, worker: Worker
) -> None:
    period_s = int(calendar_month(datetime.now(UTC))[0].timestamp())
    stream = keys.user_keys("rm").stream
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    await settle_entry(redis, stream, f"{now_ms}-0", "rm", "pre", 700, period_s)
    assert await drain(worker) == 1  # its own batch, before the reset's
    reset_fields = {"k": "reset", "u": "rm", "ps": period_s, "t": now_ms}
    await redis.xadd(stream, reset_fields, id=f"{now_ms}-1")  # type: ignore[arg-type]
    await settle_entry(redis, stream, f"{now_ms}-2", "rm", "post", 40, period_s)
    assert await drain(worker) == 2
    assert await total(pg, "rm") == 40


async def settle_entry(
    redis: Redis,
    stream: str,
    entry_id: str,
    user_id: str,
    reservation_id: str,
    tokens: int,
    period_s: int,
) -> None:
    """A late commit's entry as lua/commit.lua writes it, at a chosen stream position."""
    fields = {
        "k": "committed",
        "u": user_id,
        "r": reservation_id,
        "tr": 0,
        "tc": tokens,
        "l": 1,
        "md": "",
        "t": int(entry_id.split("-")[0]),
        "ps": period_s,
    }
    await redis.xadd(stream, fields, id=entry_id)  # type: ignore[arg-type]


async def test_stream_positions_computed_in_python_equal_postgres_ones(pg: AsyncEngine) -> None:
    """Events carry positions computed by the worker, resets positions computed by Postgres:
    the two must order a stream alike, caps included."""
    ids = [b"0-0", b"1-1", b"1733000000000-0", b"1733000000000-999999", b"1733000000000-1000000"]
    ids += [b"9223372036853-5", b"9223372036854775807-18446744073709551615"]
    async with pg.connect() as conn:
        for entry_id in ids:
            expected = await conn.scalar(
                text("SELECT stream_entry_position(:id)"), {"id": entry_id.decode()}
            )
            assert stream_position(entry_id) == expected, entry_id
