"""Redis lost a reservation's record (flushed, restarted without persistence, or the record's
24 hours passed) after the sync worker moved its settlement into Postgres: a retried commit or
refund gets Postgres' answer instead of being charged, or refused, as if it were new."""

from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from quota_common import settings as settings_module
from sync_worker.worker import Worker
from tests.api import commit, refund, reserve, usage
from tests.sync.conftest import drain, worker_env


@pytest.fixture
async def worker(base_env: dict[str, str]) -> AsyncIterator[Worker]:
    instance = Worker(settings_module.load(worker_env(base_env)))
    await instance.start()
    yield instance
    await instance.close()


async def test_retries_after_redis_lost_the_records_get_postgres_answer(
    http: httpx.AsyncClient, redis: Redis, worker: Worker
) -> None:
    assert (await reserve(http, "lost", 1000, reservation_id="c"))[0] == 200
    status, first = await commit(http, "lost", "c", 400)
    assert status == 200 and first["charged"] == 400
    assert (await reserve(http, "lost", 300, reservation_id="f"))[0] == 200
    assert (await refund(http, "lost", "f"))[0] == 200
    await drain(worker)
    await redis.flushdb()

    status, again = await commit(http, "lost", "c", 400)
    assert status == 200, again
    assert (again["replayed"], again["charged"], again["released"], again["late"]) == (
        True,
        400,
        600,
        False,
    )
    assert again["used"] == 400  # reloaded from Postgres, and not charged a second time
    status, body = await commit(http, "lost", "c", 401)
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    status, body = await refund(http, "lost", "c")
    assert status == 409 and body["error"]["code"] == "already_committed"

    status, body = await refund(http, "lost", "f")
    assert status == 200 and body["replayed"] is True and body["status"] == "refunded"
    assert body["released"] == 300
    status, body = await commit(http, "lost", "f", 10)
    assert status == 409 and body["error"]["code"] == "already_refunded"

    # A reservation Postgres never saw is a late commit, charged as always.
    status, body = await commit(http, "lost", "never", 50)
    assert status == 200 and body["late"] is True and body["replayed"] is False
    assert (await usage(http, "lost"))["used"] == 450
