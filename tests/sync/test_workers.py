"""The worker as a real process under load through the real sidecar: kill -9 in the middle
of a batch, two workers at once, a graceful stop."""

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import keys
from sync_worker.streams import STREAMS
from tests.servers import BIN, Process, eventually
from tests.sync.conftest import start_worker
from tests.sync.helpers import Load, assert_books, drive, synced


@pytest.fixture
def workers(base_env: dict[str, str], logs_dir: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def metric(url: str, prefix: str) -> float:
    """The sum of one worker's samples whose name starts with `prefix`, from its /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=2).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
        and not line.startswith("#")
        and "_created" not in line.split(" ", 1)[0]
    )


def events_written(url: str) -> float:
    return metric(url, "quota_sync_events_total{")


async def pending(redis: Redis) -> int:
    """Entries read by some worker and not acknowledged yet, over all streams."""
    pipe = redis.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xpending(stream, keys.SETTLE_GROUP)
    return sum(int(answer["pending"]) for answer in await pipe.execute())


def worker_url(process: Process) -> str:
    return f"http://127.0.0.1:{process.env['SYNC_WORKER_PORT']}"


@pytest.mark.slow
async def test_kill_9_mid_batch_loses_and_doubles_nothing(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    redis: Redis,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    # Small batches, so a kill lands between a read and its acknowledgement.
    first = start_worker(base_env, logs_dir, SYNC_BATCH_SIZE="200")
    workers.append(first)
    load = Load()
    users = [f"k{n}" for n in range(40)]
    traffic = asyncio.create_task(drive(http, load, users, 1500))

    async def mid_batch() -> bool:
        # Written some already, and holding entries it has read but not acknowledged.
        written = await asyncio.to_thread(events_written, worker_url(first))
        return written >= 200 and await pending(redis) > 0

    await eventually(mid_batch, 30, "the first worker in the middle of a batch", 0.005)
    first.kill()
    left_pending = await pending(redis)
    second = start_worker(base_env, logs_dir, SYNC_BATCH_SIZE="200")
    workers.append(second)
    await traffic
    assert load.errors == 0 and len(load.committed) == 1500

    await eventually(lambda: synced(pg, load), 30, "every commit in Postgres")
    await assert_books(pg, load)
    if left_pending:
        # The dead worker's entries were taken over, not just left behind.
        claimed = await asyncio.to_thread(metric, worker_url(second), "quota_sync_claimed")
        assert claimed > 0


@pytest.mark.slow
async def test_two_workers_share_the_work_without_duplicates(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    workers.extend(
        start_worker(base_env, logs_dir, SYNC_BATCH_SIZE="100", SYNC_POLL_INTERVAL_MS="5")
        for _ in range(2)
    )
    load = Load()
    await drive(http, load, [f"t{n}" for n in range(64)], 1000)
    await eventually(lambda: synced(pg, load), 30, "every commit in Postgres")
    await assert_books(pg, load)
    written = [await asyncio.to_thread(events_written, worker_url(w)) for w in workers]
    assert all(n > 0 for n in written), written
    # Each entry written once in all (a claim would write some twice, harmlessly, but
    # nothing here stalls long enough to be claimed).
    assert sum(written) == len(load.committed), written


async def test_first_sigterm_finishes_the_batch_and_exits_cleanly(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    base_env: dict[str, str],
    logs_dir: Path,
    workers: list[Process],
) -> None:
    worker = start_worker(base_env, logs_dir)
    workers.append(worker)
    load = Load()
    await drive(http, load, ["s1", "s2"], 200)
    await eventually(lambda: synced(pg, load), 20, "every commit in Postgres")
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0
    await assert_books(pg, load)


def test_bad_setting_exits_with_one_line_naming_it(base_env: dict[str, str]) -> None:
    for name, env in (
        ("ALERT_WEBHOOK_SECRET", {"ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"}),
        ("SYNC_BATCH_SIZE", {"SYNC_BATCH_SIZE": "0"}),
        ("ALERT_WEBHOOK_URL", {"ALERT_WEBHOOK_URL": "ftp://x", "ALERT_WEBHOOK_SECRET": "s"}),
    ):
        done = subprocess.run(
            [str(BIN / "quota-sync-worker")],
            env={**os.environ, **base_env, **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and name in done.stderr
