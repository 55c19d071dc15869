"""The core guarantees on a single Redis and on a real three-master Redis Cluster: the same Lua
scripts, the same sidecar, only REDIS_URL differs."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.periods import calendar_month
from quota_common.schema import usage_events, usage_totals
from tests.api import commit, refund, reserve, usage
from tests.conftest import REDIS_URL, start_sidecar
from tests.servers import RedisCluster, eventually
from tests.sync.conftest import start_worker


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module", params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "single":
        return REDIS_URL
    cluster: RedisCluster = request.getfixturevalue("cluster")
    return cluster.url


@pytest.fixture(scope="module")
def store_sidecar(store: str, base_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    process, url = start_sidecar(base_env, logs_dir, REDIS_URL=store)
    yield url
    process.stop()


@pytest.fixture
async def http_any(
    store_sidecar: str, store: str, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    if store != REDIS_URL:
        cluster: RedisCluster = request.getfixturevalue("cluster")
        for node in cluster.nodes:
            cluster.cli(node, "flushall")
    limits = httpx.Limits(max_connections=300)
    async with httpx.AsyncClient(base_url=store_sidecar, limits=limits, timeout=30) as client:
        yield client


async def test_no_over_grant(http_any: httpx.AsyncClient) -> None:
    # FREE: 100,000 tokens; 300 reserves of 700 each can be granted floor(100000/700) = 142 times.
    results = await asyncio.gather(*(reserve(http_any, "hana", 700) for _ in range(300)))
    granted = [body for status, body in results if status == 200]
    assert len(granted) == 100_000 // 700
    assert {status for status, _ in results} == {200, 429}
    final = await usage(http_any, "hana")
    assert final["reserved"] == 700 * len(granted) and final["used"] == 0


async def test_settles_once(http_any: httpx.AsyncClient) -> None:
    assert (await reserve(http_any, "ivan", 500, reservation_id="x1"))[0] == 200
    results = await asyncio.gather(*(commit(http_any, "ivan", "x1", 300) for _ in range(50)))
    assert all(status == 200 for status, _ in results)
    assert sum(1 for _, body in results if not body["replayed"]) == 1
    assert (await refund(http_any, "ivan", "x1"))[0] == 409
    final = await usage(http_any, "ivan")
    assert (final["used"], final["reserved"]) == (300, 0)


async def test_state_rebuilds_from_postgres(
    http_any: httpx.AsyncClient, pg: AsyncEngine, store: str, request: pytest.FixtureRequest
) -> None:
    start, _ = calendar_month(datetime.now(UTC))
    async with pg.begin() as conn:
        await conn.execute(
            insert(usage_totals).values(user_id="jack", period_start=start, tokens_charged=99_000)
        )
    status, body = await reserve(http_any, "jack", 2_000)
    assert status == 429 and body["used"] == 99_000
    assert (await reserve(http_any, "jack", 1_000))[0] == 200


async def test_users_spread_over_every_master(
    http_any: httpx.AsyncClient, store: str, request: pytest.FixtureRequest
) -> None:
    await asyncio.gather(*(reserve(http_any, f"spread-{i}", 1) for i in range(60)))
    if store == REDIS_URL:
        return
    cluster: RedisCluster = request.getfixturevalue("cluster")
    sizes = [int(cluster.cli(node, "dbsize")) for node in cluster.nodes]
    assert all(size > 0 for size in sizes), sizes


async def test_script_flush_everywhere_mid_run(
    http_any: httpx.AsyncClient, store: str, request: pytest.FixtureRequest
) -> None:
    assert (await reserve(http_any, "kate", 10))[0] == 200
    if store == REDIS_URL:
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        await client.script_flush()
        await client.aclose()
    else:
        cluster: RedisCluster = request.getfixturevalue("cluster")
        for node in cluster.nodes:
            cluster.cli(node, "script", "flush")
    assert (await reserve(http_any, "kate", 10))[0] == 200
    assert (await usage(http_any, "kate"))["reserved"] == 20


async def test_no_lost_usage(
    http_any: httpx.AsyncClient,
    store: str,
    base_env: dict[str, str],
    logs_dir: Path,
    pg: AsyncEngine,
) -> None:
    """Every commit answered 200 reaches Postgres exactly once through the sync worker, on a
    single Redis and on the cluster (one stream per bucket, each on its own slot)."""
    worker = start_worker(base_env, logs_dir, REDIS_URL=store)
    try:
        users = [f"flow-{i}" for i in range(40)]

        async def flow(i: int) -> int:
            user = users[i % len(users)]
            status, _ = await reserve(http_any, user, 100, reservation_id=f"c{i}")
            assert status == 200
            status, body = await commit(http_any, user, f"c{i}", 1 + i % 90)
            assert status == 200
            return int(body["charged"])

        charged = await asyncio.gather(*(flow(i) for i in range(300)))

        async def recorded() -> bool:
            async with pg.connect() as conn:
                row = (
                    await conn.execute(
                        select(
                            func.count(), func.coalesce(func.sum(usage_events.c.tokens_charged), 0)
                        ).where(usage_events.c.user_id.like("flow-%"))
                    )
                ).one()
            return (row[0], row[1]) == (300, sum(charged))

        await eventually(recorded, 30, "every commit in usage_events")
        async with pg.connect() as conn:
            total = await conn.scalar(
                select(func.sum(usage_totals.c.tokens_charged)).where(
                    usage_totals.c.user_id.like("flow-%")
                )
            )
        assert total == sum(charged)
    finally:
        worker.stop()
