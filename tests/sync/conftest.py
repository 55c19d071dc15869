"""Fixtures of the sync worker tests: the worker in-process (for `run_once()` tests) or as a
real `quota-sync-worker` process (for fault tests), and polling helpers."""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import settings as settings_module
from sync_worker.worker import Worker
from tests.servers import Process, free_port


def worker_env(base_env: dict[str, str], **env: str) -> dict[str, str]:
    """Worker settings for tests: short claim and poll times, so faults resolve in seconds."""
    return {
        **base_env,
        "SYNC_WORKER_PORT": str(free_port()),
        "SYNC_CLAIM_IDLE_MS": "1500",
        "SYNC_POLL_INTERVAL_MS": "20",
        "SYNC_REAP_INTERVAL_MS": "200",
        "SYNC_DRIFT_INTERVAL_S": "1",
        "ALERT_WEBHOOK_BACKOFF_MS": "100",
        "ALERT_WEBHOOK_BACKOFF_MAX_MS": "500",
        **env,
    }


def start_worker(base_env: dict[str, str], logs_dir: Path, **env: str) -> Process:
    settings = worker_env(base_env, **env)
    port = settings["SYNC_WORKER_PORT"]
    return Process(
        "quota-sync-worker",
        settings,
        logs_dir / f"worker-{port}.log",
        ready_url=f"http://127.0.0.1:{port}/healthz",
    ).start()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """The processes a test starts, killed (kill -9) at its end, last started first."""
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.kill()


MakeWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def make_worker(base_env: dict[str, str]) -> AsyncIterator[MakeWorker]:
    """Workers in this process, started (groups, scripts, listener) but not looping; each
    its own consumer, as separate processes would be. Settings as keyword arguments."""
    made: list[Worker] = []

    async def make(**env: str) -> Worker:
        instance = Worker(settings_module.load(worker_env(base_env, **env)))
        await instance.start()
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.close()


@pytest.fixture
async def worker(make_worker: MakeWorker) -> Worker:
    """A worker in this process that claims what others leave pending after 100 ms."""
    return await make_worker(SYNC_CLAIM_IDLE_MS="100")


async def drain(worker: Worker, rounds_max: int = 1000) -> int:
    """Runs the settle step until the streams are empty; returns the entries written."""
    total = 0
    for _ in range(rounds_max):
        written = await worker.run_once()
        if written == 0:
            return total
        total += written
    raise AssertionError("the streams never emptied")


async def rows(pg: AsyncEngine, query: str, **params: Any) -> list[Any]:
    async with pg.connect() as conn:
        return list((await conn.execute(text(query), params)).all())


async def scalar(pg: AsyncEngine, query: str, **params: Any) -> Any:
    async with pg.connect() as conn:
        return await conn.scalar(text(query), params)
