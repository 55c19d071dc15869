"""Redis losing its scripts (SCRIPT FLUSH, as after a restart) or its data (FLUSHDB of the test
database; never FLUSHALL, other databases of this server belong to others): calls keep working
and the state comes back from Postgres (guarantee 5)."""

import asyncio

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.api import commit, refund, reserve, usage
from tests.books import assert_books_balance, crowd, seed_used
from tests.servers import eventually


async def test_script_flush_mid_run_costs_no_call(
    http: httpx.AsyncClient, sidecar_url: str, redis: Redis
) -> None:
    statuses: list[int] = []
    charged: list[int] = []

    async def chat(i: int, http: httpx.AsyncClient) -> None:
        status, body = await reserve(http, "busy", 100, reservation_id=f"r{i}")
        statuses.append(status)
        if status != 200:
            return
        if i % 2:
            status, body = await commit(http, "busy", f"r{i}", 60)
            charged.append(body.get("charged", 0))
        else:
            status, body = await refund(http, "busy", f"r{i}")
        statuses.append(status)

    async def flusher() -> None:
        # The script cache is server-wide (other databases' users share it): a few flushes,
        # each once the traffic has answered more calls since the last one.
        for flush in range(5):
            await redis.script_flush()

            async def progressed(answered: int = 40 * (flush + 1)) -> bool:
                return len(statuses) >= answered

            await eventually(progressed, 30, "calls answered since the last flush")

    async with crowd(sidecar_url) as clients:
        await asyncio.gather(*(chat(i, clients[i % len(clients)]) for i in range(300)), flusher())
    assert set(statuses) == {200}, sorted(set(statuses))
    await assert_books_balance(redis, "busy", base_used=0, charged=sum(charged), held=0)
    assert sum(charged) == 150 * 60
    response = await http.get("/readyz")
    assert response.status_code == 200


async def test_state_comes_back_from_postgres_after_flushdb(
    http: httpx.AsyncClient, redis: Redis, pg: AsyncEngine
) -> None:
    assert (await reserve(http, "phoenix", 2000, reservation_id="a"))[0] == 200
    assert (await commit(http, "phoenix", "a", 2000))[0] == 200
    # What the sync worker would have written by now.
    await seed_used(pg, "phoenix", 7777)
    await redis.flushdb()
    status, body = await reserve(http, "phoenix", 100, reservation_id="b")
    assert status == 200, body
    assert (body["used"], body["reserved"], body["limit"]) == (7777, 100, 100_000)
    assert (await usage(http, "phoenix"))["used"] == 7777
    # Scripts are gone as well after a real restart; nothing answers 5xx.
    await redis.script_flush()
    await redis.flushdb()
    status, body = await commit(http, "phoenix", "b", 50)
    assert status == 200 and body["late"] is True and body["used"] == 7777 + 50
    await assert_books_balance(redis, "phoenix", base_used=7777, charged=50, held=0)
