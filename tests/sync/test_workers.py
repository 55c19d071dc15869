"""The worker as a real process under load through the real sidecar: kill -9 in the middle
of a batch, two workers at once, and stopping: the first SIGTERM finishes the batch in hand
(and stops a worker still starting), the second stops at once."""

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.servers import BIN, Process, eventually, free_port
from tests.sync.conftest import start_worker, worker_env
from tests.sync.helpers import (
    TWO_WRITERS_USERS,
    Load,
    assert_books,
    backlog,
    books,
    drive,
    end_dead_workers_transactions,
    events_written,
    metric,
    pending,
    synced,
    worker_blocked,
    worker_url,
    writes_blocked,
)


@pytest.mark.slow
async def test_kill_9_mid_batch_loses_and_doubles_nothing(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    redis: Redis,
    base_env: dict[str, str],
    logs_dir: Path,
    processes: list[Process],
) -> None:
    # Small batches, so a kill lands between a read and its acknowledgement.
    first = start_worker(base_env, logs_dir, SYNC_BATCH_SIZE="200")
    processes.append(first)
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
    processes.append(second)
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
    processes: list[Process],
) -> None:
    processes.extend(
        start_worker(base_env, logs_dir, SYNC_BATCH_SIZE="100", SYNC_POLL_INTERVAL_MS="5")
        for _ in range(2)
    )
    load = Load()
    await drive(http, load, [f"t{n}" for n in range(64)], 1000)
    await eventually(lambda: synced(pg, load), 30, "every commit in Postgres")
    await assert_books(pg, load)
    written = [await asyncio.to_thread(events_written, worker_url(w)) for w in processes]
    assert all(n > 0 for n in written), written
    # Each entry written once in all (a claim would write some twice, harmlessly, but
    # nothing here stalls long enough to be claimed).
    assert sum(written) == len(load.committed), written


def both(first: Load, second: Load) -> Load:
    merged = Load()
    merged.committed = {**first.committed, **second.committed}
    return merged


async def commit_until_held(
    http: httpx.AsyncClient, pg: AsyncEngine, redis: Redis, load: Load, commits: int
) -> int:
    """Under writes_blocked: commits, then waits for both of the worker's writers to hold a
    batch of them in hand (read, its write waiting); returns how many entries they hold."""
    await drive(http, load, TWO_WRITERS_USERS, commits, 4)
    await eventually(lambda: worker_blocked(pg, redis, 2), 10, "a batch in each writer's hand")
    return await pending(redis)


async def test_first_sigterm_finishes_the_batch_in_hand_and_reads_nothing_new(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    redis: Redis,
    base_env: dict[str, str],
    logs_dir: Path,
    processes: list[Process],
) -> None:
    worker = start_worker(base_env, logs_dir)
    processes.append(worker)
    before, during = Load(), Load()
    async with writes_blocked(pg):
        in_hand = await commit_until_held(http, pg, redis, before, 40)
        worker.signal(signal.SIGTERM)
        # Settled while the worker stops: it must leave these to the next worker.
        await drive(http, during, TWO_WRITERS_USERS, 20, 4)
        assert worker.alive(), "the worker left before writing the batch in its hand"
    assert worker.proc is not None
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0
    _, _, written = await books(pg)
    assert (written, await pending(redis)) == (in_hand, 0)  # written and acknowledged
    assert await backlog(redis) == 40 + 20 - in_hand  # nothing new was read
    processes.append(start_worker(base_env, logs_dir))
    everything = both(before, during)
    await eventually(lambda: synced(pg, everything), 20, "every commit in Postgres")
    await assert_books(pg, everything)


async def test_second_sigterm_stops_at_once_leaving_the_batch_pending(
    http: httpx.AsyncClient,
    pg: AsyncEngine,
    redis: Redis,
    base_env: dict[str, str],
    logs_dir: Path,
    processes: list[Process],
) -> None:
    worker = start_worker(base_env, logs_dir, LOG_LEVEL="INFO")
    processes.append(worker)
    load = Load()
    async with writes_blocked(pg):
        in_hand = await commit_until_held(http, pg, redis, load, 30)
        worker.signal(signal.SIGTERM)

        async def first_heard() -> bool:
            return "stopping after the current batch" in worker.log_path.read_text()

        # Two signals sent before the first is handled arrive as one.
        await eventually(first_heard, 5, "the first SIGTERM handled")
        worker.signal(signal.SIGTERM)
        assert worker.proc is not None
        # It stops while its write still waits: status 1, the batch not acknowledged.
        assert await asyncio.to_thread(worker.proc.wait, 10) == 1
        assert await pending(redis) == in_hand
    await end_dead_workers_transactions(pg)
    assert (await books(pg))[2] == 0
    # The next worker takes the batch over: nothing lost, nothing twice.
    processes.append(start_worker(base_env, logs_dir))
    await eventually(lambda: synced(pg, load), 20, "every commit in Postgres")
    await assert_books(pg, load)


@pytest.mark.parametrize("store", ["postgres", "redis"])
async def test_first_sigterm_stops_a_worker_retrying_a_store_that_is_down(
    base_env: dict[str, str], logs_dir: Path, processes: list[Process], store: str
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    down = (
        {"DATABASE_URL": f"postgresql://postgres@{nobody}/quota"}
        if store == "postgres"
        else {"REDIS_URL": f"redis://{nobody}/0"}
    )
    env = worker_env(base_env, **down)
    log_path = logs_dir / f"worker-{env['SYNC_WORKER_PORT']}.log"
    worker = Process("quota-sync-worker", env, log_path).start()
    processes.append(worker)

    async def retrying() -> bool:
        return worker.running() and "start failed" in log_path.read_text()

    await eventually(retrying, 20, "the worker retrying its start")
    url = f"http://127.0.0.1:{env['SYNC_WORKER_PORT']}/healthz"
    health = await asyncio.to_thread(httpx.get, url, timeout=2)
    assert (health.status_code, health.json()["status"]) == (503, "starting")
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None
    assert await asyncio.to_thread(worker.proc.wait, 5) == 0


def test_bad_setting_exits_with_one_line_naming_it(base_env: dict[str, str]) -> None:
    for name, env in (
        ("ALERT_WEBHOOK_SECRET", {"ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"}),
        ("SYNC_BATCH_SIZE", {"SYNC_BATCH_SIZE": "0"}),
        ("SYNC_WRITERS", {"SYNC_WRITERS": "0"}),
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
