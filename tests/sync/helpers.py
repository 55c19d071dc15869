"""Load through the real sidecar, and the books checked against Postgres afterwards."""

import asyncio
import itertools
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import db, keys
from quota_common.migrate import create_database_if_missing, upgrade
from sync_worker.streams import STREAMS
from tests.servers import Process, free_port, wait_until

_ids = itertools.count()


@dataclass
class Load:
    """What the sidecar answered: every commit that got a 200, by (user, reservation)."""

    committed: dict[tuple[str, str], int] = field(default_factory=dict)
    # When each commit request was sent (monotonic), to tell commits made after a fault.
    sent_at: dict[tuple[str, str], float] = field(default_factory=dict)
    refused: int = 0
    errors: int = 0

    def charged_by_user(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for (user, _), tokens in self.committed.items():
            totals[user] = totals.get(user, 0) + tokens
        return totals

    def sent_after(self, moment: float) -> "Load":
        """The commits whose request left after `moment` (so ran in Redis after it)."""
        later = Load()
        later.committed = {
            key: tokens for key, tokens in self.committed.items() if self.sent_at[key] > moment
        }
        return later


async def drive(
    http: httpx.AsyncClient,
    load: Load,
    users: list[str],
    commits: int,
    concurrency: int = 32,
    stop: asyncio.Event | None = None,
) -> None:
    """`commits` reserve+commit pairs over `users`, `concurrency` at a time. Errors (a store
    that is down) are counted, not raised: the test asserts on what was answered 200."""
    queue = iter(range(commits))

    async def one_client() -> None:
        for n in queue:
            if stop is not None and stop.is_set():
                return
            user = users[n % len(users)]
            rid = f"r{next(_ids)}"
            tokens = 1 + n % 97
            try:
                reserved = await http.post(
                    "/v1/reserve", json={"user_id": user, "tokens": 100, "reservation_id": rid}
                )
                if reserved.status_code == 429:
                    load.refused += 1
                    continue
                if reserved.status_code != 200:
                    load.errors += 1
                    continue
                load.sent_at[(user, rid)] = time.monotonic()
                done = await http.post(
                    "/v1/commit", json={"user_id": user, "reservation_id": rid, "tokens": tokens}
                )
            except httpx.HTTPError:
                load.errors += 1
                continue
            if done.status_code == 200:
                load.committed[(user, rid)] = done.json()["charged"]
            else:
                load.errors += 1

    await asyncio.gather(*(one_client() for _ in range(concurrency)))


async def books(pg: AsyncEngine) -> tuple[dict[tuple[str, str], int], dict[str, int], int]:
    """Committed events by (user, reservation), totals by user, and the count of event rows
    (duplicates are impossible by the unique key; counted anyway)."""
    async with pg.connect() as conn:
        events = (
            await conn.execute(
                text(
                    "SELECT user_id, reservation_id, tokens_charged FROM usage_events"
                    " WHERE status = 'committed'"
                )
            )
        ).all()
        totals = (
            await conn.execute(
                text("SELECT user_id, sum(tokens_charged) FROM usage_totals GROUP BY user_id")
            )
        ).all()
        count = await conn.scalar(text("SELECT count(*) FROM usage_events"))
    return (
        {(u, r): int(t) for u, r, t in events},
        {u: int(t) for u, t in totals},
        int(count or 0),
    )


async def assert_books(pg: AsyncEngine, load: Load) -> None:
    """Every commit answered 200 is in usage_events exactly once with its charge, and each
    user's total equals the sum of the user's events."""
    events, totals, _ = await books(pg)
    missing = set(load.committed) - set(events)
    assert not missing, f"{len(missing)} commits answered 200 are not in Postgres"
    for key, tokens in load.committed.items():
        assert events[key] == tokens, key
    by_user: dict[str, int] = {}
    for (user, _), tokens in events.items():
        by_user[user] = by_user.get(user, 0) + tokens
    assert totals == {u: t for u, t in by_user.items() if t}, "totals differ from the events"


async def synced(pg: AsyncEngine, load: Load) -> bool:
    events, _, _ = await books(pg)
    return set(load.committed) <= set(events)


class PrivatePostgres:
    """A Postgres cluster of this test alone (initdb in a temporary directory, its own
    port), so stopping it for an outage never disturbs the shared server on 5432."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").iterdir())
        self.bin = versions[-1] / "bin"
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="quota-pg-", dir="/tmp"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/quota"

    def _run(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def init(self) -> "PrivatePostgres":
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )
        self.start()
        create_database_if_missing(self.url)
        engine = db.sync_engine(self.url)
        upgrade(engine)
        engine.dispose()
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )
        wait_until(self.answers, 20, "private postgres")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def answers(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        )
        return result.returncode == 0

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def metric(url: str, prefix: str) -> float:
    """The sum of one worker's samples whose name starts with `prefix`, from its /metrics."""
    body = httpx.get(f"{url}/metrics", timeout=2).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(prefix)
        and not line.startswith("#")
        and "_created" not in line.split(" ", 1)[0]
    )


def events_written(url: str) -> float:
    return metric(url, "quota_sync_events_total{")


def worker_url(process: Process) -> str:
    return f"http://127.0.0.1:{process.env['SYNC_WORKER_PORT']}"


async def pending(redis: Redis) -> int:
    """Entries read by some worker and not acknowledged yet, over all streams."""
    pipe = redis.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xpending(stream, keys.SETTLE_GROUP)
    return sum(int(answer["pending"]) for answer in await pipe.execute())


async def backlog(redis: Redis) -> int:
    """Entries in the streams: read or not, not yet acknowledged (acknowledged ones are
    deleted)."""
    pipe = redis.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xlen(stream)
    return sum(int(n) for n in await pipe.execute())


# Worker connections of this test database waiting for a lock (their batch in hand).
BLOCKED_WORKERS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'quota-sync-worker'
  AND wait_event_type = 'Lock'
"""


@asynccontextmanager
async def writes_blocked(pg: AsyncEngine) -> AsyncIterator[None]:
    """Holds a lock on usage_events that makes every worker's batch wait in its INSERT: the
    batch is then really in hand (read from Redis, not written), for as long as this lasts."""
    async with pg.connect() as conn:
        await conn.execute(text("LOCK TABLE usage_events IN SHARE MODE"))
        yield
        await conn.rollback()


# A user of each share of a worker with the default two writers (buckets 112 and 127).
TWO_WRITERS_USERS = ["s1", "s4"]


async def worker_blocked(pg: AsyncEngine, redis: Redis, writers: int = 1) -> bool:
    """At least `writers` settle loops hold a batch (entries pending) and wait in their
    Postgres write."""
    async with pg.connect() as conn:
        blocked = await conn.scalar(text(BLOCKED_WORKERS))
    return int(blocked or 0) >= writers and await pending(redis) > 0


async def end_dead_workers_transactions(pg: AsyncEngine) -> None:
    """A worker killed with kill -9 leaves its backend waiting until Postgres notices the
    closed socket; end it now, as Postgres would, so its transaction is rolled back."""
    async with pg.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'quota-sync-worker'"
            )
        )
