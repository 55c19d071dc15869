"""The core guarantees on a single Redis and on a real three-master Redis Cluster: the same Lua
scripts, the same sidecar, only REDIS_URL differs."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from quota_common.periods import calendar_month
from quota_common.schema import usage_events, usage_totals
from sidecar.outage import Breakers
from tests.api import commit, refund, reserve, usage
from tests.conftest import REDIS_URL, start_sidecar
from tests.outage_helpers import burst_within_bound
from tests.servers import RedisCluster, eventually, free_port, wait_until
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


def masters_of(cluster: RedisCluster, users: list[str]) -> dict[int, list[str]]:
    """The users by the port of the master that holds their slot (CLUSTER NODES: address, then
    from the ninth field on the master's slot ranges)."""
    ranges: list[tuple[int, int, int]] = []
    for line in cluster.cli(cluster.nodes[0], "cluster", "nodes").splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for span in fields[8:]:
            low, _, high = span.partition("-")
            ranges.append((int(low), int(high or low), port))
    by_port: dict[int, list[str]] = {}
    for user in users:
        slot = key_slot(user_keys(user).state.encode())
        by_port.setdefault(next(p for lo, hi, p in ranges if lo <= slot <= hi), []).append(user)
    return by_port


async def test_redis_cluster_setting_with_a_plain_url(
    cluster: RedisCluster, base_env: dict[str, str], logs_dir: Path
) -> None:
    """REDIS_CLUSTER=1 and an ordinary redis:// URL naming one node: the sidecar finds the
    others and every master gets its users."""
    for node in cluster.nodes:
        cluster.cli(node, "flushall")
    node = cluster.nodes[1]
    process, url = start_sidecar(
        base_env, logs_dir, REDIS_URL=f"redis://127.0.0.1:{node.port}/0", REDIS_CLUSTER="1"
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            users = [f"plain-{i}" for i in range(30)]
            for user in users:
                assert (await reserve(http, user, 10, reservation_id="p"))[0] == 200
                status, body = await commit(http, user, "p", 4)
                assert status == 200 and body["used"] == 4
        sizes = [int(cluster.cli(each, "dbsize")) for each in cluster.nodes]
        assert all(size > 0 for size in sizes), sizes
        assert set(masters_of(cluster, users)) == {each.port for each in cluster.nodes}
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sick_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private cluster for pausing a master. The healthy masters keep serving once the
    cluster marks it failed (cluster-require-full-coverage no), as an operator would run it
    for that."""
    nodes = RedisCluster(tmp_path_factory.mktemp("sick-cluster")).start()
    for node in nodes.nodes:
        nodes.cli(node, "config", "set", "cluster-require-full-coverage", "no")
    yield nodes
    nodes.stop()


@pytest.fixture
def one_master_paused(
    sick_cluster: RedisCluster, base_env: dict[str, str], logs_dir: Path
) -> Iterator[tuple[str, list[str], list[str]]]:
    """A sidecar on the cluster whose users all hold a reservation, then one master SIGSTOPped:
    (sidecar URL, users on the paused master, users on the others)."""
    process, url = start_sidecar(
        base_env, logs_dir, REDIS_URL=sick_cluster.url, REDIS_TIMEOUT_MS="50"
    )
    users = [f"sick-{i}" for i in range(60)]
    by_port = masters_of(sick_cluster, users)
    sick = sick_cluster.nodes[0]
    with httpx.Client(base_url=url, timeout=10) as http:
        for user in users:
            body = {"user_id": user, "tokens": 10, "reservation_id": "warm"}
            assert http.post("/v1/reserve", json=body).status_code == 200
    sick.pause()
    try:
        healthy = [user for port, group in by_port.items() if port != sick.port for user in group]
        yield url, by_port[sick.port], healthy
    finally:
        sick.resume()
        process.stop()


async def test_a_paused_master_answers_within_the_bound(
    one_master_paused: tuple[str, list[str], list[str]],
) -> None:
    """Hundreds of reserves at once while one master hangs: every one answered in time, and
    every user of the paused master refused with 503 store_unavailable (never a 500)."""
    url, on_sick, on_healthy = one_master_paused
    requests = [
        ("/v1/reserve", {"user_id": user, "tokens": 1}) for user in (on_sick + on_healthy) * 3
    ]
    for answer in await burst_within_bound(url, requests):
        if answer.body.get("user_id", "") in on_sick or answer.status != 200:
            assert (answer.status, answer.body["error"]["code"]) == (503, "store_unavailable")


async def test_users_of_healthy_masters_keep_being_served(
    one_master_paused: tuple[str, list[str], list[str]],
) -> None:
    url, on_sick, on_healthy = one_master_paused
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for user in on_sick[:5]:
            assert (await reserve(http, user, 1))[0] == 503
        statuses = [(await reserve(http, user, 1))[0] for user in on_healthy]
    assert set(statuses) == {200}


async def test_a_cluster_unreachable_at_start_is_an_outage_not_a_crash(
    base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    """redis-py's cluster client reports "no node answers" with an exception that is no
    RedisError: still the sidecar starts, refuses reserves with 503 and journals commits."""
    process, url = start_sidecar(
        base_env,
        logs_dir,
        REDIS_URL=f"redis+cluster://127.0.0.1:{free_port()}",
        SIDECAR_JOURNAL_DIR=str(tmp_path / "journal"),
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            status, body = await reserve(http, "nobody", 1)
            assert (status, body["error"]["code"]) == (503, "store_unavailable")
            status, body = await commit(http, "nobody", "r1", 1)
            assert status == 200 and body["degraded"] is True
    finally:
        process.stop()


async def test_one_breaker_per_master(cluster: RedisCluster) -> None:
    """The ledger's breakers (sidecar.outage.Breakers): a master that keeps failing opens its
    own breaker only; a single Redis has one breaker for everyone."""
    client = AsyncRedisCluster.from_url(f"redis://127.0.0.1:{cluster.nodes[0].port}")
    try:
        await client.initialize()
        users = [f"b-{i}" for i in range(30)]
        by_port = masters_of(cluster, users)
        assert len(by_port) == 3
        breakers = Breakers(client)
        first, *others = [group[0] for group in by_port.values()]
        for _ in range(3):
            breakers.for_key(user_keys(first).state).failed()
        assert breakers.for_key(user_keys(first).state).open
        assert not any(breakers.for_key(user_keys(user).state).open for user in others)
        for group in by_port.values():  # the same master, the same breaker
            assert len({id(breakers.for_key(user_keys(user).state)) for user in group}) == 1
    finally:
        await client.aclose()
    single = Breakers(Redis.from_url(REDIS_URL))
    assert single.for_key(user_keys("x").state) is single.for_key(user_keys("y").state)


async def test_the_outage_budget_is_one_per_user_across_breakers(cluster: RedisCluster) -> None:
    """FAIL_MODE=open's budget belongs to the user, not to a master's breaker: spent under ""
    (the slot map not read yet), it is not granted again once the user's slot maps to a real
    master that fails too, nor when another master answers meanwhile. It ends when every
    master answers again; and the breaker of "" is dropped once the map is read."""
    client = AsyncRedisCluster.from_url(f"redis://127.0.0.1:{cluster.nodes[0].port}")
    try:
        breakers = Breakers(client)
        key = user_keys("olga").state
        unmapped = breakers.for_key(key)
        for _ in range(3):
            unmapped.failed()
        assert breakers.outage.spend("olga", 60, 0, 100) == 60
        await client.initialize()
        mapped = breakers.for_key(key)
        assert mapped is not unmapped and "" not in breakers.by_master
        mapped.failed()
        assert breakers.outage.spend("olga", 60, 0, 100) == 0
        by_port = masters_of(cluster, [f"o-{i}" for i in range(30)])
        elsewhere = next(
            group[0]
            for group in by_port.values()
            if breakers.for_key(user_keys(group[0]).state) is not mapped
        )
        breakers.for_key(user_keys(elsewhere).state).succeeded()
        assert breakers.outage.spend("olga", 60, 40, 100) == 40
        mapped.succeeded()
        assert breakers.outage.spend("olga", 100, 0, 100) == 100
    finally:
        await client.aclose()


async def test_journalled_entries_wait_only_for_their_own_master(
    sick_cluster: RedisCluster, base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    """Every master paused while commits are journalled, then all but one resume: the entries
    of the healthy masters' users reach Redis, though those of the paused master's users come
    first in the journal and cannot be applied; theirs follow once it resumes."""
    process, url = start_sidecar(
        base_env,
        logs_dir,
        REDIS_URL=sick_cluster.url,
        REDIS_TIMEOUT_MS="50",
        SIDECAR_JOURNAL_DIR=str(tmp_path / "journal"),
    )
    sick, *others = sick_cluster.nodes
    try:
        by_port = masters_of(sick_cluster, [f"j-{i}" for i in range(30)])
        on_sick = by_port[sick.port][:3]
        healthy = [user for node in others for user in by_port[node.port][:3]]
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for user in on_sick + healthy:
                assert (await reserve(http, user, 10, reservation_id="j"))[0] == 200
            for node in sick_cluster.nodes:
                node.pause()
            try:
                for user in on_sick + healthy:
                    status, body = await commit(http, user, "j", 4)
                    assert status == 200 and body["degraded"] is True
            finally:
                for node in others:
                    node.resume()

            async def charged(users: list[str]) -> bool:
                for user in users:
                    response = await http.get(f"/v1/usage/{user}")
                    if response.status_code != 200 or response.json()["used"] != 4:
                        return False
                return True

            try:
                await eventually(lambda: charged(healthy), 10, "the healthy masters' entries")
                assert not await charged(on_sick[:1])
            finally:
                sick.resume()
            await eventually(lambda: charged(on_sick), 15, "the resumed master's entries")
    finally:
        process.stop()
        wait_until(sick_cluster.healthy, 30, "the cluster healthy again", interval_s=0.1)
