"""Guarantee 8: Redis stopped, paused or back empty. The sidecar answers every request within
100 ms, hundreds at once, and never hangs; FAIL_MODE decides reserves; commits made meanwhile are
journalled and reach Redis and Postgres afterwards, with no traffic needed, also when the
sidecar that journalled them was killed."""

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common.keys import user_keys
from quota_common.periods import calendar_month
from quota_common.schema import usage_events, usage_totals
from tests.api import commit, refund, reserve, usage
from tests.conftest import start_sidecar
from tests.outage_helpers import Connection, Timed, burst_within_bound, connections
from tests.servers import Process, RedisServer, eventually
from tests.sync.conftest import start_worker

BURST = 200
# Chat flows one connection runs at most in the SIGTERM test (the server closes it first).
ROUNDS_MAX = 50


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def sidecar_on(
    redis_server: RedisServer,
    base_env: dict[str, str],
    logs_dir: Path,
    journal_dir: Path,
    **env: str,
) -> tuple[Process, str]:
    return start_sidecar(
        base_env,
        logs_dir,
        REDIS_URL=redis_server.url,
        REDIS_TIMEOUT_MS="50",
        SIDECAR_JOURNAL_DIR=str(journal_dir),
        **env,
    )


@pytest.fixture
async def closed_sidecar(
    private_redis: RedisServer, base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    process, url = sidecar_on(private_redis, base_env, logs_dir, tmp_path / "journal")
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client
    process.stop()


def reserves(count: int, users: int = 20) -> list[tuple[str, dict[str, Any]]]:
    return [("/v1/reserve", {"user_id": f"user-{i % users}", "tokens": 10}) for i in range(count)]


def assert_refused(answers: list[Timed]) -> None:
    assert {(a.status, a.body["error"]["code"]) for a in answers} == {(503, "store_unavailable")}


async def test_stopped_redis_answers_every_request_fast(
    closed_sidecar: httpx.AsyncClient, private_redis: RedisServer
) -> None:
    """Hundreds of reserves and journalled commits at once, while the breaker opens and once it
    is open: reserves are 503, commits 200 degraded, every one within the bound."""
    holds = [
        await reserve(closed_sidecar, f"user-{i}", 10, reservation_id=f"h{i}") for i in range(50)
    ]
    assert all(status == 200 for status, _ in holds)
    private_redis.stop()
    url = str(closed_sidecar.base_url)
    commits = [
        ("/v1/commit", {"user_id": f"user-{i}", "reservation_id": f"h{i}", "tokens": 5})
        for i in range(50)
    ]
    for wave in (reserves(BURST - 50) + commits, reserves(BURST)):
        answers = await burst_within_bound(url, wave)
        assert_refused([a for a in answers if a.path == "/v1/reserve"])
        assert all(
            a.status == 200 and a.body["degraded"] for a in answers if a.path == "/v1/commit"
        )
    assert (await closed_sidecar.get("/readyz")).status_code == 503


async def test_paused_redis_answers_every_request_fast_then_recovers(
    closed_sidecar: httpx.AsyncClient, private_redis: RedisServer
) -> None:
    """SIGSTOP: the connection stays open and Redis says nothing, so every call in flight waits
    for its deadline; the answers still come within the bound, and the sidecar serves again
    once Redis does."""
    assert (await reserve(closed_sidecar, "user-0", 10))[0] == 200
    private_redis.pause()
    try:
        url = str(closed_sidecar.base_url)
        for _ in range(2):
            assert_refused(await burst_within_bound(url, reserves(BURST)))
    finally:
        private_redis.resume()

    async def serves() -> bool:
        return (await reserve(closed_sidecar, "user-1", 10))[0] == 200

    await eventually(serves, 5, "the sidecar to serve again after SIGCONT")


async def test_redis_back_empty_rebuilds_from_postgres(
    closed_sidecar: httpx.AsyncClient, private_redis: RedisServer, pg: AsyncEngine
) -> None:
    period_start, _ = calendar_month(datetime.now(UTC))
    async with pg.begin() as conn:
        await conn.execute(
            insert(usage_totals).values(
                user_id="carol", period_start=period_start, tokens_charged=70_000
            )
        )
    assert (await usage(closed_sidecar, "carol"))["used"] == 70_000
    private_redis.stop()
    assert (await reserve(closed_sidecar, "carol", 10))[0] == 503
    private_redis.start()

    async def rebuilt() -> bool:
        status, body = await reserve(closed_sidecar, "carol", 40_000)
        return status == 429 and body["used"] == 70_000

    await eventually(rebuilt, 5, "a reserve against the rebuilt state")


@pytest.fixture
def open_sidecar(
    private_redis: RedisServer, base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> Iterator[str]:
    """FAIL_MODE=open with an outage budget of 100 tokens per user."""
    process, url = sidecar_on(
        private_redis,
        base_env,
        logs_dir,
        tmp_path / "journal",
        FAIL_MODE="open",
        FAIL_OPEN_BUDGET="100",
    )
    yield url
    process.stop()


async def test_fail_open_grants_the_outage_budget(
    open_sidecar: str, private_redis: RedisServer
) -> None:
    async with httpx.AsyncClient(base_url=open_sidecar, timeout=10) as http:
        assert (await reserve(http, "dave", 10))[0] == 200
        private_redis.stop()
        granted = []
        for _ in range(6):
            status, body = await reserve(http, "dave", 30)
            if status == 200:
                assert body["degraded"] is True
                granted.append(body["granted"])
            else:
                assert status == 503
        assert sum(granted) <= 100 and granted == [30, 30, 30]
        status, body = await reserve(http, "dave", 30, min_tokens=5)
        assert status == 200 and body["granted"] == 10 and body["degraded"] is True
        assert (await reserve(http, "erin", 30))[0] == 200  # the budget is per user
        status, first = await reserve(http, "erin", 20, reservation_id="retry-me")
        status_again, again = await reserve(http, "erin", 20, reservation_id="retry-me")
        assert status == status_again == 200 and again["replayed"] is True
        assert again["reserved"] == first["reserved"] == 50  # the retry spent nothing
        assert (await reserve(http, "erin", 21, reservation_id="retry-me"))[0] == 409


async def test_fail_open_on_a_paused_redis(open_sidecar: str, private_redis: RedisServer) -> None:
    """FAIL_MODE=open with Redis hanging: hundreds of reserves at once, each answered within
    the bound, and no user granted more than the outage budget."""
    async with httpx.AsyncClient(base_url=open_sidecar, timeout=10) as http:
        assert (await reserve(http, "user-0", 10))[0] == 200
    private_redis.pause()
    try:
        answers = await burst_within_bound(open_sidecar, reserves(BURST, users=10))
        granted: dict[str, int] = {}
        for answer in answers:
            if answer.status == 200:
                assert answer.body["degraded"] is True
                user = answer.body["user_id"]
                granted[user] = granted.get(user, 0) + answer.body["granted"]
            else:
                assert (answer.status, answer.body["error"]["code"]) == (503, "store_unavailable")
        # 20 reserves of 10 per user against a budget of 100: exactly 10 granted each.
        assert granted == {f"user-{i}": 100 for i in range(10)}
    finally:
        private_redis.resume()


async def used_in_redis(server: RedisServer, user_id: str) -> int:
    client = Redis.from_url(server.url)
    try:
        used = await client.hget(user_keys(user_id).state, "used")
    finally:
        await client.aclose()
    return int(used or 0)


async def commit_in_an_outage(
    url: str, redis_server: RedisServer, user_id: str, charges: list[int]
) -> None:
    """Holds one reservation per charge, stops Redis, then commits each: every one answered
    200 and degraded (journalled)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for i in range(len(charges)):
            assert (await reserve(http, user_id, 100, reservation_id=f"r{i}"))[0] == 200
        redis_server.stop()
        for i, tokens in enumerate(charges):
            status, body = await commit(http, user_id, f"r{i}", tokens)
            assert status == 200 and body["degraded"] is True and body["charged"] == tokens


async def test_an_idle_sidecar_applies_its_journal_when_redis_is_back(
    private_redis: RedisServer,
    base_env: dict[str, str],
    logs_dir: Path,
    tmp_path: Path,
    pg: AsyncEngine,
) -> None:
    """Commits journalled during an outage (the breaker open) reach Redis once it is back with
    no request to the sidecar at all, and from there Postgres through a sync worker."""
    journal = tmp_path / "journal"
    process, url = sidecar_on(private_redis, base_env, logs_dir, journal)
    try:
        await commit_in_an_outage(url, private_redis, "frank", list(range(40, 45)))
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert (await reserve(http, "frank", 1))[0] == 503  # the breaker is open
        private_redis.start()  # back empty: the commits become late charges
        charged = sum(range(40, 45))

        async def in_redis() -> bool:
            return await used_in_redis(private_redis, "frank") == charged

        await eventually(in_redis, 10, "the journalled commits to reach Redis, unprompted")

        async def applied_files_gone() -> bool:
            # Removed once their last entry is applied, so just after Redis shows the total;
            # left is the sidecar's current file, with nothing in it.
            return all(path.stat().st_size == 0 for path in journal.glob("journal-*"))

        await eventually(applied_files_gone, 5, "the applied journal files to be removed")
        worker = start_worker(base_env, logs_dir, REDIS_URL=private_redis.url)
        try:

            async def in_postgres() -> bool:
                async with pg.connect() as conn:
                    rows = (
                        await conn.execute(
                            select(
                                func.count(),
                                func.coalesce(func.sum(usage_events.c.tokens_charged), 0),
                            ).where(usage_events.c.user_id == "frank")
                        )
                    ).one()
                return (rows[0], rows[1]) == (5, charged)

            await eventually(in_postgres, 15, "the journalled commits in usage_events")
        finally:
            worker.stop()
    finally:
        process.stop()


async def test_a_killed_sidecars_journal_is_adopted_by_another(
    private_redis: RedisServer, base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of a sidecar holding journalled commits; its file then torn as a power cut
    leaves it, and a corrupt line in its middle. A second sidecar on the same directory applies
    every good entry, counts the two bad lines and keeps the file's bytes as *.bad."""
    journal = tmp_path / "journal"
    first, url = sidecar_on(private_redis, base_env, logs_dir, journal)
    try:
        await commit_in_an_outage(url, private_redis, "gus", list(range(10, 14)))
    finally:
        first.kill()
    files = sorted(journal.glob("journal-*.jsonl"), key=lambda path: path.stat().st_size)
    torn = files[-1]
    lines = torn.read_bytes().splitlines(keepends=True)
    assert lines, "the killed sidecar journalled nothing"
    torn.write_bytes(b"".join([lines[0], b"\x00\x00 not json\n", *lines[1:], b'{"op":"com']))
    original = torn.read_bytes()

    private_redis.start()
    second, url = sidecar_on(private_redis, base_env, logs_dir, journal)
    try:

        async def adopted() -> bool:
            return await used_in_redis(private_redis, "gus") == sum(range(10, 14))

        await eventually(adopted, 10, "the killed sidecar's commits to reach Redis")
        kept = torn.with_name(torn.name + ".bad")
        assert kept.read_bytes() == original
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            metrics = (await http.get("/metrics")).text
        assert "quota_journal_set_aside_entries_total 2.0" in metrics
    finally:
        second.stop()


async def test_refused_and_malformed_replays_are_kept_for_an_operator(
    private_redis: RedisServer, base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    """Journalled settlements the ledger refuses once Redis answers again, though their
    clients heard 200: a commit of other tokens than the reservation's first commit, and a
    refund after a commit. Each is counted by its code and kept in a *.bad file. Then a file an
    operator wrote elsewhere and moved in: its line with metadata its request would have been
    refused for is set aside, the good line beside it applied."""
    journal = tmp_path / "journal"
    process, url = sidecar_on(private_redis, base_env, logs_dir, journal)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for rid, tokens in (("c1", 5), ("c2", 3)):
                assert (await reserve(http, "hal", 10, reservation_id=rid))[0] == 200
                assert (await commit(http, "hal", rid, tokens))[0] == 200
            private_redis.pause()
            try:
                status, body = await commit(http, "hal", "c1", 7)
                assert status == 200 and body["degraded"] is True
                status, body = await refund(http, "hal", "c2")
                assert status == 200 and body["degraded"] is True
            finally:
                private_redis.resume()

            async def refusals_kept() -> bool:
                text = (await http.get("/metrics")).text
                return all(
                    f'quota_journal_refused_entries_total{{code="{code}"}} 1.0' in text
                    for code in ("idempotency_conflict", "already_committed")
                ) and bool(list(journal.glob("*.jsonl.bad")))

            await eventually(refusals_kept, 10, "the refused replays counted and kept")
            (kept,) = journal.glob("*.jsonl.bad")
            assert [
                orjson.loads(line)["reservation_id"] for line in kept.read_bytes().splitlines()
            ] == [
                "c1",
                "c2",
            ]
            assert (await usage(http, "hal"))["used"] == 8

            settle = {"op": "commit", "user_id": "hal", "tokens": 2}
            lines = [
                {
                    **settle,
                    "reservation_id": "m1",
                    "metadata": orjson.dumps({"k": "x" * 300}).decode(),
                },
                {**settle, "reservation_id": "m2", "metadata": '{"conversation_id":"c9"}'},
            ]
            repaired = tmp_path / "repaired.jsonl"
            repaired.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
            repaired.rename(journal / "journal-repaired.jsonl")

            async def repaired_applied() -> bool:
                return (journal / "journal-repaired.jsonl.bad").exists()

            await eventually(repaired_applied, 10, "the operator's file applied")
            assert (await usage(http, "hal"))["used"] == 10
            assert "quota_journal_set_aside_entries_total 3.0" in (await http.get("/metrics")).text
    finally:
        process.stop()


async def test_sigterm_lets_in_flight_requests_finish(
    private_redis: RedisServer, base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM in the middle of chat flows (reserve, then commit) that 300 kept-alive
    connections run one after the other until the server closes them. Every request is
    answered, or dropped by the closing server without having done anything: a reserve with no
    answer holds nothing and a commit with no answer charged nothing (both checked afterwards).
    No request hangs, none is answered 5xx, and every commit answered 200 is in the books."""
    journal = tmp_path / "journal"
    process, url = sidecar_on(private_redis, base_env, logs_dir, journal)
    ready = await connections(url, 300)
    statuses: list[int] = []
    answered_commits: list[int] = []
    unanswered: dict[str, str] = {}  # reservation id -> the call that got no answer
    under_way = asyncio.Event()

    async def call(what: str, rid: str, connection: Connection, body: dict[str, Any]) -> int:
        try:
            async with asyncio.timeout(10):  # a hang fails the test
                status, _ = await connection.post(f"/v1/{what}", body)
        except (asyncio.IncompleteReadError, ConnectionError):
            unanswered[rid] = what
            return 0
        statuses.append(status)
        if len(statuses) >= 300:
            under_way.set()
        return status

    async def flows(connection: Connection, i: int) -> None:
        for round_ in range(ROUNDS_MAX):
            rid = f"g{i}-{round_}"
            user = {"user_id": "gina", "reservation_id": rid}
            if await call("reserve", rid, connection, {**user, "tokens": 2}) != 200:
                break
            status = await call("commit", rid, connection, {**user, "tokens": 1})
            if status != 200:
                break
            answered_commits.append(1)
        connection.close()

    tasks = [asyncio.create_task(flows(connection, i)) for i, connection in enumerate(ready)]
    try:
        await asyncio.wait_for(under_way.wait(), 30)
        process.signal(signal.SIGTERM)
        answered_before_sigterm = len(statuses)
        await asyncio.gather(*tasks)
    finally:
        exit_status = process.stop()
    # uvicorn ends a graceful shutdown by re-raising the signal.
    assert exit_status in (0, -signal.SIGTERM)
    assert statuses and all(status < 500 for status in statuses)
    # The shutdown met traffic: requests were answered after the signal, and connections were
    # closed under flows that still had requests to send.
    assert len(statuses) > answered_before_sigterm and unanswered
    restarted, url = sidecar_on(private_redis, base_env, logs_dir, journal)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert (await usage(http, "gina"))["used"] == sum(answered_commits)
            for rid, what in unanswered.items():
                status, body = await refund(http, "gina", rid)
                # An unanswered reserve never held (404); an unanswered commit never charged
                # (its hold is still there to refund).
                expected = 404 if what == "reserve" else 200
                assert status == expected, (rid, what, body)
    finally:
        restarted.stop()
