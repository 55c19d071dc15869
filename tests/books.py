"""The ledger's books read straight from Redis, for invariant checks after concurrent tests, and a
snapshot of the whole test Redis database for "nothing changed" checks.

The books balance when the user's state agrees with the reservation records and with the settle
stream: `used` is the base seeded from Postgres plus what every commit charged, `reserved` is the
sum of the open holds, and no reservation settled twice."""

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from quota_common.periods import calendar_month
from quota_common.schema import subscriptions, usage_totals


@asynccontextmanager
async def crowd(base_url: str, clients: int = 10) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Several HTTP clients for hundreds of simultaneous requests: httpx's pool scans every
    connection for each request, so one client with 500 connections costs seconds of CPU."""
    async with AsyncExitStack() as stack:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        yield [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30)
            )
            for _ in range(clients)
        ]


async def snapshot(redis: Redis) -> dict[bytes, bytes | None]:
    """Every key of the test database with its DUMP: equal snapshots mean nothing changed."""
    keys = sorted([key async for key in redis.scan_iter(count=1000)])
    dumps = [await redis.dump(key) for key in keys]
    return dict(zip(keys, dumps, strict=True))


async def seed_used(pg: AsyncEngine, user_id: str, tokens: int) -> None:
    """Usage Postgres already records for a FREE user this calendar month (what the sync worker
    would have written): the next cold load starts from it."""
    start, _ = calendar_month(datetime.now(UTC))
    async with pg.begin() as conn:
        await conn.execute(
            insert(usage_totals).values(user_id=user_id, period_start=start, tokens_charged=tokens)
        )


async def record_subscription(
    pg: AsyncEngine, user_id: str, plan: str, start: datetime, end: datetime, **fields: object
) -> None:
    """An active subscription row as the billing API records it (no Stripe behind it)."""
    async with pg.begin() as conn:
        await conn.execute(
            insert(subscriptions).values(
                user_id=user_id,
                plan=plan,
                status="active",
                current_period_start=start,
                current_period_end=end,
                **fields,
            )
        )


def text(value: bytes | None) -> str:
    return "" if value is None else value.decode()


# Typed reads: redis-py's annotations cover sync and async clients at once.
async def hash_of(redis: Redis, key: str) -> dict[bytes, bytes]:
    result: Any = await redis.hgetall(key)
    return dict(result)


async def field_of(redis: Redis, key: str, name: str) -> bytes | None:
    result: Any = await redis.hget(key, name)
    return None if result is None else bytes(result)


async def set_fields(redis: Redis, key: str, **fields: str | int) -> None:
    mapping: Any = dict(fields)
    await redis.hset(key, mapping=mapping)


async def stream_entries(redis: Redis, key: str) -> list[dict[bytes, bytes]]:
    result: Any = await redis.xrange(key)
    return [dict(entry) for _, entry in result]


@dataclass
class Books:
    used: int
    reserved: int
    limit: int
    held_open: int
    open_holds: int
    charged_in_stream: int
    settlements: dict[str, Counter[str]] = field(default_factory=dict)


async def read_books(redis: Redis, user_id: str) -> Books:
    keys = user_keys(user_id)
    state = await hash_of(redis, keys.state)
    held_open = 0
    holds: list[Any] = await redis.zrange(keys.holds, 0, -1)
    for rid in holds:
        record = await hash_of(redis, keys.record(rid.decode()))
        assert record.get(b"s") == b"H", f"hold {rid!r} listed as open, record {record!r}"
        held_open += int(record[b"g"])
    charged = 0
    settlements: dict[str, Counter[str]] = {}
    for entry in await stream_entries(redis, keys.stream):
        if text(entry.get(b"u")) != user_id or b"r" not in entry:
            continue
        kind = text(entry[b"k"])
        settlements.setdefault(text(entry[b"r"]), Counter())[kind] += 1
        if kind == "committed":
            charged += int(entry[b"tc"])
    return Books(
        used=int(state[b"used"]),
        reserved=int(state[b"reserved"]),
        limit=int(state[b"quota"]) + int(state.get(b"credits", b"0")),
        held_open=held_open,
        open_holds=len(holds),
        charged_in_stream=charged,
        settlements=settlements,
    )


async def assert_books_balance(
    redis: Redis, user_id: str, *, base_used: int, charged: int, held: int
) -> Books:
    """`charged`: what the commit answers charged in total; `held`: what the open holds hold,
    both as the test's own client saw them."""
    books = await read_books(redis, user_id)
    assert books.used == base_used + charged, books
    assert books.charged_in_stream == charged, books
    assert books.reserved == held, books
    assert books.held_open == held, books
    for rid, kinds in books.settlements.items():
        # Settled at most once: one commit or one refund; an expiry may precede a late commit.
        assert kinds["committed"] <= 1 and kinds["refunded"] <= 1 and kinds["expired"] <= 1, rid
        assert not (kinds["committed"] and kinds["refunded"]), rid
        assert not (kinds["refunded"] and kinds["expired"]), rid
    return books
