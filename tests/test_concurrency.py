"""Guarantee 1 under real concurrency: 500 simultaneous HTTP calls to the sidecar process."""

import asyncio
import random
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.api import commit, refund, reserve, usage
from tests.books import assert_books_balance, crowd, seed_used

LIMIT = 100_000
CALLS = 500


def within_limit(body: dict[str, Any]) -> bool:
    return int(body["used"]) + int(body["reserved"]) <= int(body["limit"])


async def test_500_simultaneous_reserves_grant_exactly_floor_r_over_t(
    http: httpx.AsyncClient, sidecar_url: str, redis: Redis, pg: AsyncEngine
) -> None:
    base = 2_345
    await seed_used(pg, "crowd", base)
    remaining, tokens = LIMIT - base, 300

    async with crowd(sidecar_url) as clients:
        answers = await asyncio.gather(
            *(
                reserve(clients[i % len(clients)], "crowd", tokens, reservation_id=f"c{i}")
                for i in range(CALLS)
            )
        )

    statuses = [status for status, _ in answers]
    granted = remaining // tokens
    assert statuses.count(200) == granted
    assert statuses.count(429) == CALLS - granted
    for status, body in answers:
        if status == 200:
            assert body["granted"] == tokens and not body["replayed"]
            assert within_limit(body), body
        else:
            assert body["error"]["code"] == "quota_exceeded"
            assert body["remaining"] < tokens and within_limit(body), body
    now = await usage(http, "crowd")
    assert now["reserved"] == granted * tokens and now["used"] == base
    assert now["remaining"] == remaining - granted * tokens
    await assert_books_balance(redis, "crowd", base_used=base, charged=0, held=granted * tokens)


async def test_500_reserves_with_commits_and_refunds_interleaved(
    http: httpx.AsyncClient, sidecar_url: str, redis: Redis, pg: AsyncEngine
) -> None:
    base = 40_000
    await seed_used(pg, "mixed", base)
    tokens = 250
    rng = random.Random(3)
    plans = [
        (rng.choice(("commit", "refund", "keep")), rng.randint(0, tokens)) for _ in range(CALLS)
    ]
    charged: list[int] = []
    held: list[int] = []
    seen: list[dict[str, Any]] = []

    async def one(i: int, http: httpx.AsyncClient) -> None:
        action, used = plans[i]
        status, body = await reserve(http, "mixed", tokens, reservation_id=f"m{i}")
        seen.append(body)
        if status == 429:
            return
        assert status == 200, body
        if action == "commit":
            status, body = await commit(http, "mixed", f"m{i}", used)
            assert status == 200 and body["charged"] == used and not body["late"], body
            assert body["released"] == tokens - used
            charged.append(used)
        elif action == "refund":
            status, body = await refund(http, "mixed", f"m{i}")
            assert status == 200 and body["status"] == "refunded", body
            assert body["released"] == tokens
        else:
            held.append(tokens)
        seen.append(body)

    async def watch() -> None:
        # Usage read while the storm runs: never above the limit either.
        for _ in range(50):
            seen.append(await usage(http, "mixed"))

    async with crowd(sidecar_url) as clients:
        await asyncio.gather(*(one(i, clients[i % len(clients)]) for i in range(CALLS)), watch())

    assert all(within_limit(body) for body in seen if "used" in body)
    books = await assert_books_balance(
        redis, "mixed", base_used=base, charged=sum(charged), held=sum(held)
    )
    assert books.used + books.reserved <= LIMIT
    # What is left can be reserved to the last token, and no more.
    left = LIMIT - books.used - books.reserved
    if left:
        status, body = await reserve(http, "mixed", left)
        assert status == 200 and body["remaining"] == 0, body
    status, _ = await reserve(http, "mixed", 1)
    assert status == 429


async def test_racing_settlements_settle_each_reservation_once(
    http: httpx.AsyncClient, sidecar_url: str, redis: Redis
) -> None:
    """The same reservation committed and refunded by several callers at once (a client and
    its retries): one settlement wins, the others replay it or are refused; nothing twice."""
    holds, tokens = 60, 100
    async with crowd(sidecar_url) as clients:
        # Duplicate reserves race too: each id is held once.
        reserves = await asyncio.gather(
            *(
                reserve(clients[(i + k) % len(clients)], "race", tokens, reservation_id=f"x{i}")
                for i in range(holds)
                for k in range(3)
            )
        )
        assert all(status == 200 for status, _ in reserves)
        assert sum(not body["replayed"] for _, body in reserves) == holds
        assert (await usage(http, "race"))["reserved"] == holds * tokens

        calls = []
        for i in range(holds):
            for k in range(3):
                client = clients[(i + k) % len(clients)]
                calls.append(commit(client, "race", f"x{i}", 40 + i))
                calls.append(refund(client, "race", f"x{i}"))
        answers = await asyncio.gather(*calls)

    charged = 0
    for i in range(holds):
        mine = answers[i * 6 : i * 6 + 6]
        commits, refunds = mine[0::2], mine[1::2]
        firsts = [body for status, body in mine if status == 200 and not body["replayed"]]
        assert len(firsts) == 1, mine
        if firsts[0]["status"] == "committed":
            charged += 40 + i
            assert all(status == 200 and body["charged"] == 40 + i for status, body in commits)
            assert all(body["error"]["code"] == "already_committed" for _, body in refunds)
        else:
            assert all(status == 200 for status, _ in refunds)
            assert all(body["error"]["code"] == "already_refunded" for _, body in commits)
    books = await assert_books_balance(redis, "race", base_used=0, charged=charged, held=0)
    assert len(books.settlements) == holds
