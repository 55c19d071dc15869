"""The settle step through `run_once()`: what reaches Postgres for each kind of settlement,
and that writing the same entries again changes nothing."""

import asyncio

import httpx
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import keys
from sync_worker.flush import build_batch
from sync_worker.streams import STREAMS, Entry
from sync_worker.worker import Worker
from tests.api import commit, refund, reserve
from tests.sync.conftest import MakeWorker, drain, rows, scalar
from tests.sync.helpers import TWO_WRITERS_USERS

LAST_SUCCESS = "quota_sync_last_success_timestamp_seconds"


async def test_commit_refund_and_expiry_reach_postgres_once(
    http: httpx.AsyncClient, worker: Worker, pg: AsyncEngine
) -> None:
    assert (await reserve(http, "ann", 500, reservation_id="c1", metadata={"conv": "x"}))[0] == 200
    assert (await commit(http, "ann", "c1", 300))[0] == 200
    assert (await reserve(http, "ann", 200, reservation_id="r1"))[0] == 200
    assert (await refund(http, "ann", "r1"))[0] == 200
    assert (await commit(http, "ann", "never-reserved", 50))[0] == 200

    assert await drain(worker) == 3
    events = await rows(
        pg,
        "SELECT reservation_id, status, tokens_reserved, tokens_charged, late, metadata"
        " FROM usage_events ORDER BY reservation_id",
    )
    assert [tuple(e) for e in events] == [
        ("c1", "committed", 500, 300, False, {"conv": "x"}),
        ("never-reserved", "committed", 0, 50, True, {}),
        ("r1", "refunded", 200, 0, False, {}),
    ]
    assert await scalar(pg, "SELECT sum(tokens_charged) FROM usage_totals") == 350


async def test_late_commit_after_expiry_replaces_the_expired_row(
    http: httpx.AsyncClient, worker: Worker, pg: AsyncEngine
) -> None:
    assert (await reserve(http, "bob", 400, reservation_id="slow", ttl_s=1))[0] == 200

    # The reaper settles the expiry once the hold is past expires_at.
    async def expired() -> bool:
        await worker.reaper.run_once()
        return await drain(worker) > 0

    from tests.servers import eventually

    await eventually(expired, 5, "the expiry to be settled")
    assert await rows(pg, "SELECT status, tokens_reserved, tokens_charged FROM usage_events") == [
        ("expired", 400, 0)
    ]
    status, body = await commit(http, "bob", "slow", 350)
    assert status == 200 and body["late"] is True
    await drain(worker)
    assert await rows(
        pg, "SELECT status, tokens_reserved, tokens_charged, late FROM usage_events"
    ) == [("committed", 400, 350, True)]
    assert await scalar(pg, "SELECT tokens_charged FROM usage_totals") == 350


async def test_same_entries_written_twice_count_once(
    http: httpx.AsyncClient, worker: Worker, pg: AsyncEngine, redis: Redis
) -> None:
    for n in range(20):
        assert (await commit(http, f"u{n % 3}", f"r{n}", 10 + n))[0] == 200
    entries: list[Entry] = []
    for stream in STREAMS:
        found: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(stream)  # type: ignore[assignment]
        for entry_id, fields in found:
            flat = [part for pair in fields.items() for part in pair]
            entries.append((stream, entry_id, flat))
    assert len(entries) == 20
    batch = build_batch(entries)
    # The same batch three times (a crash between commit and XACK, then a claim), and a
    # batch holding every entry twice.
    await worker.settlers[0].flusher.write(batch)
    await worker.settlers[0].flusher.write(batch)
    await worker.settlers[0].flusher.write(build_batch(entries + entries))
    await drain(worker)
    assert await scalar(pg, "SELECT count(*) FROM usage_events") == 20
    assert await scalar(pg, "SELECT sum(tokens_charged) FROM usage_totals") == sum(
        10 + n for n in range(20)
    )
    assert await redis.xlen(keys.user_keys("u0").stream) == 0


async def test_reset_counts_only_what_is_settled_after_it(
    http: httpx.AsyncClient, worker: Worker, pg: AsyncEngine
) -> None:
    headers = {"Authorization": "Bearer test-admin-token"}
    assert (await commit(http, "cat", "before-1", 700))[0] == 200
    await drain(worker)
    assert (await commit(http, "cat", "before-2", 100))[0] == 200
    reset = await http.post("/admin/v1/users/cat/reset", json={"reason": "test"}, headers=headers)
    assert reset.status_code == 200, reset.text
    assert (await commit(http, "cat", "after-1", 40))[0] == 200
    assert (await commit(http, "cat", "after-2", 2))[0] == 200
    await drain(worker)
    assert await scalar(pg, "SELECT count(*) FROM usage_events") == 4
    assert await scalar(pg, "SELECT tokens_charged FROM usage_totals") == 42
    usage = (await http.get("/v1/usage/cat")).json()
    assert usage["used"] == 42


async def test_unknown_stream_entry_is_acknowledged_not_blocking(
    worker: Worker, redis: Redis, pg: AsyncEngine
) -> None:
    await redis.xadd(STREAMS[0], {"k": "from-the-future", "u": "x"})
    await redis.xadd(
        STREAMS[0],
        {
            "k": "committed",
            "u": "x",
            "r": "a",
            "tr": "0",
            "tc": "5",
            "l": "1",
            "md": "not json",
            "t": "1700000000000",
            "ps": "1698796800",
        },
    )
    assert await drain(worker) == 2
    assert await rows(pg, "SELECT reservation_id, metadata FROM usage_events") == [("a", {})]


async def test_writers_read_their_own_share_and_together_every_stream(
    http: httpx.AsyncClient, make_worker: MakeWorker, pg: AsyncEngine
) -> None:
    """SYNC_WRITERS settle loops split the streams: a user's settlements are read by one
    writer only, so no two of them write the same rows, and no stream is left unread."""
    worker = await make_worker(SYNC_WRITERS="3")
    users = [f"w{n}" for n in range(60)]
    answers = await asyncio.gather(*(commit(http, u, f"r-{u}", 7) for u in users))
    assert all(status == 200 for status, _ in answers)
    shares = [set(settler.streams.streams) for settler in worker.settlers]
    assert sum(len(share) for share in shares) == len(STREAMS) == len(set().union(*shares))

    read = await asyncio.gather(*(settler.read() for settler in worker.settlers))
    # 60 users over 128 streams: each writer's share of 42-43 streams has some of them.
    helds = [held for held in read if held is not None]
    assert len(helds) == 3
    read_by: dict[str, int] = {}
    for writer, held in enumerate(helds):
        for stream, _, fields in held.entries:
            assert stream in shares[writer]
            read_by[fields[fields.index(b"u") + 1].decode()] = writer
    assert sorted(read_by) == sorted(users)
    assert all(worker.settler_of(u) is worker.settlers[w] for u, w in read_by.items())

    await asyncio.gather(
        *(settler.write(held) for settler, held in zip(worker.settlers, helds, strict=True))
    )
    assert await scalar(pg, "SELECT sum(tokens_charged) FROM usage_totals") == 7 * len(users)


async def test_a_stuck_writer_shows_in_the_last_success_whatever_the_others_do(
    http: httpx.AsyncClient, make_worker: MakeWorker, pg: AsyncEngine
) -> None:
    """The success clock (`/healthz` age, quota_sync_last_success_timestamp_seconds) is the
    writer that succeeded least recently: one writer stuck on half the streams must not be
    hidden by the other writing on."""
    worker = await make_worker()
    held_back, free = TWO_WRITERS_USERS
    stuck, going = worker.settler_of(held_back), worker.settler_of(free)
    assert stuck is not going
    assert (await commit(http, held_back, "first", 5))[0] == 200
    await drain(worker)
    async with pg.connect() as other:
        await other.execute(
            text("SELECT 1 FROM usage_totals WHERE user_id = :u FOR UPDATE"), {"u": held_back}
        )
        assert (await commit(http, held_back, "blocked", 5))[0] == 200
        assert (await commit(http, free, "free", 5))[0] == 200
        blocked = asyncio.create_task(stuck.run_once())
        assert await going.run_once() == 1
        assert going.last_success > stuck.last_success > 0
        assert worker.last_success() == stuck.last_success
        assert REGISTRY.get_sample_value(LAST_SUCCESS) == stuck.last_success
        assert not blocked.done()
        await other.rollback()
    assert await blocked == 1
    assert worker.last_success() == min(stuck.last_success, going.last_success) > 0
