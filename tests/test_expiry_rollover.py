"""Guarantee 3 (an unsettled hold stops counting at expires_at, no job needed) and periods that
roll over by themselves. Periods are moved in Redis by the test; nothing waits for a month."""

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from redis.asyncio import Redis

from quota_common.keys import user_keys
from quota_common.periods import calendar_month, rfc3339
from tests.api import commit, refund, reserve, usage
from tests.books import assert_books_balance, crowd, field_of, hash_of, set_fields
from tests.servers import eventually

DAY_S = 86_400


async def test_short_holds_expire_and_stop_counting(http: httpx.AsyncClient, redis: Redis) -> None:
    for i in range(3):
        status, _ = await reserve(http, "u1", 1000, reservation_id=f"short{i}", ttl_s=1)
        assert status == 200
    assert (await reserve(http, "u1", 500, reservation_id="long", ttl_s=3600))[0] == 200
    assert (await usage(http, "u1"))["reserved"] == 3500

    async def expired() -> bool:
        return int((await usage(http, "u1"))["reserved"]) == 500

    await eventually(expired, 5, "the three 1 s holds to expire")
    now = await usage(http, "u1")
    assert (now["used"], now["remaining"]) == (0, 99_500)
    books = await assert_books_balance(redis, "u1", base_used=0, charged=0, held=500)
    assert {rid: dict(kinds) for rid, kinds in books.settlements.items()} == {
        f"short{i}": {"expired": 1} for i in range(3)
    }
    # A refund of an expired hold says so and releases nothing more; it replays.
    status, body = await refund(http, "u1", "short0")
    assert status == 200 and body["status"] == "expired" and body["reserved"] == 500
    status, body = await refund(http, "u1", "short0")
    assert status == 200 and body["status"] == "expired" and body["replayed"] is True
    assert (await usage(http, "u1"))["reserved"] == 500


async def test_an_expired_hold_no_longer_blocks_the_next_reserve(http: httpx.AsyncClient) -> None:
    """No background job: the reserve itself sees that the hold has expired."""
    status, body = await reserve(http, "u1", 100_000, reservation_id="all", ttl_s=1)
    assert status == 200 and body["remaining"] == 0

    async def granted() -> bool:
        status, _ = await reserve(http, "u1", 100_000, reservation_id="next")
        return status == 200

    await eventually(granted, 5, "a reserve after the hold's expiry")
    # The expired hold's reservation replays as it was answered.
    status, body = await reserve(http, "u1", 100_000, reservation_id="all", ttl_s=1)
    assert status == 200 and body["replayed"] is True


async def move_period(redis: Redis, user: str, **fields: str | int) -> None:
    await set_fields(redis, user_keys(user).state, **fields)


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


async def test_free_period_rolls_over_to_the_calendar_month(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    assert (await reserve(http, "u1", 5000, reservation_id="r1"))[0] == 200
    assert (await commit(http, "u1", "r1", 5000))[0] == 200
    await move_period(redis, "u1", ps=unix(datetime(2026, 9, 1, tzinfo=UTC)), credits=700)
    await move_period(redis, "u1", pe=unix(datetime(2026, 10, 1, tzinfo=UTC)), al=100)
    now = await usage(http, "u1")
    start, end = calendar_month(datetime.now(UTC))
    assert (now["plan"], now["used"], now["credits"], now["limit"]) == ("FREE", 0, 0, 100_000)
    assert (now["period_start"], now["period_end"]) == (rfc3339(start), rfc3339(end))
    assert await field_of(redis, user_keys("u1").state, "al") == b"0"


async def test_scheduled_plan_takes_over_at_period_end(
    http: httpx.AsyncClient, redis: Redis
) -> None:
    assert (await reserve(http, "u1", 10, reservation_id="r1"))[0] == 200
    assert (await commit(http, "u1", "r1", 10))[0] == 200
    now = datetime.now(UTC)
    await move_period(
        redis,
        "u1",
        plan="PLUS",
        quota=1_000_000,
        used=900_000,
        ps=unix(now - timedelta(days=31)),
        pe=unix(now - timedelta(seconds=1)),
        np="FREE",
        nq=100_000,
    )
    status, body = await reserve(http, "u1", 100_000, reservation_id="r2")
    assert status == 200, body
    start, end = calendar_month(now)
    assert (body["plan"], body["limit"], body["used"]) == ("FREE", 100_000, 0)
    assert (body["period_start"], body["period_end"]) == (rfc3339(start), rfc3339(end))
    state = await hash_of(redis, user_keys("u1").state)
    assert b"np" not in state and b"nq" not in state


async def test_paid_period_repeats_its_length(http: httpx.AsyncClient, redis: Redis) -> None:
    assert (await reserve(http, "u1", 10, reservation_id="r1"))[0] == 200
    now = datetime.now(UTC).replace(microsecond=0)
    old_end = now - timedelta(days=10)
    await move_period(
        redis,
        "u1",
        plan="PRO",
        quota=5_000_000,
        used=4_000_000,
        ps=unix(old_end - timedelta(days=30)),
        pe=unix(old_end),
    )
    body = await usage(http, "u1")
    assert (body["plan"], body["limit"], body["used"]) == ("PRO", 5_000_000, 0)
    assert body["period_start"] == rfc3339(old_end)
    assert body["period_end"] == rfc3339(old_end + timedelta(days=30))
    # Several whole periods missed: it lands on the one containing now.
    long_ago = now - timedelta(days=70)
    await move_period(
        redis, "u1", used=5, ps=unix(long_ago - timedelta(days=30)), pe=unix(long_ago)
    )
    body = await usage(http, "u1")
    assert body["used"] == 0
    assert body["period_start"] == rfc3339(long_ago + timedelta(days=60))
    assert body["period_end"] == rfc3339(long_ago + timedelta(days=90))
    # The hold made before the rollover still counts until it is settled.
    assert body["reserved"] == 10


async def test_hundreds_of_expired_holds_all_stop_counting_at_once(
    http: httpx.AsyncClient, sidecar_url: str, redis: Redis
) -> None:
    """More expired holds than one sweep batch: the very next call must not count any of them
    (awaited on Redis's own clock, so no ledger call sweeps early)."""
    holds, tokens = 300, 100
    async with crowd(sidecar_url) as clients:
        answers = await asyncio.gather(
            *(
                reserve(clients[i % len(clients)], "many", tokens, reservation_id=f"h{i}", ttl_s=1)
                for i in range(holds)
            )
        )
    assert all(status == 200 for status, _ in answers)
    last_ms = max(
        datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp() * 1000
        for _, body in answers
    )

    async def redis_clock_passed() -> bool:
        seconds, micros = await redis.time()
        return seconds * 1000 + micros / 1000 > last_ms + 1

    await eventually(redis_clock_passed, 5, "Redis's clock to pass the last expiry")
    status, body = await reserve(http, "many", 100_000, reservation_id="all")
    assert status == 200, body
    assert body["reserved"] == 100_000
    books = await assert_books_balance(redis, "many", base_used=0, charged=0, held=100_000)
    assert sum(kinds["expired"] for kinds in books.settlements.values()) == holds
