"""The reaper and the drift repair through their `run_once()`."""

import httpx
from redis.asyncio import Redis

from quota_common import keys
from sync_worker import metrics
from sync_worker.reaper import held_tokens
from sync_worker.worker import Worker
from tests.api import commit, reserve
from tests.servers import eventually
from tests.sync.conftest import drain


async def test_reaper_releases_expired_holds_of_idle_users(
    http: httpx.AsyncClient, worker: Worker, redis: Redis
) -> None:
    assert (await reserve(http, "idle", 300, reservation_id="h1", ttl_s=1))[0] == 200
    state = keys.user_keys("idle").state
    assert await redis.hget(state, "reserved") == b"300"

    async def swept() -> bool:
        await worker.reaper.run_once()
        return await redis.hget(state, "reserved") == b"0"

    await eventually(swept, 5, "the hold to be swept")
    assert await redis.zscore(keys.user_keys("idle").due, "idle") is None
    assert await drain(worker) == 1  # the expiry went to the stream


async def test_reaper_forgets_users_redis_lost(worker: Worker, redis: Redis) -> None:
    due = keys.due_set(keys.bucket_of("ghost"))
    await redis.zadd(due, {"ghost": 1})
    assert await worker.reaper.run_once() == 0
    assert await redis.zcard(due) == 0


async def drifted(
    http: httpx.AsyncClient, worker: Worker, redis: Redis, user_id: str, redis_used: int
) -> str:
    """A commit of 1000 in Postgres, then Redis `used` set apart from it; the state key."""
    assert (await commit(http, user_id, "a", 1000))[0] == 200
    await drain(worker)
    state = keys.user_keys(user_id).state
    await redis.hset(state, "used", redis_used)
    return state


async def test_drift_raises_redis_back_to_postgres(
    http: httpx.AsyncClient, worker: Worker, redis: Redis
) -> None:
    # As if Redis came back from a snapshot taken before the commit.
    state = await drifted(http, worker, redis, "old-snapshot", 100)
    assert await worker.drift.run_once() == 900
    assert await redis.hget(state, "used") == b"1000"
    assert metrics.DRIFT.labels("below")._value.get() == 900
    assert await worker.drift.run_once() == 0
    assert metrics.DRIFT.labels("below")._value.get() == 0


async def test_drift_measures_redis_above_postgres_and_never_lowers_it(
    http: httpx.AsyncClient, worker: Worker, redis: Redis
) -> None:
    # As if a charge had been counted twice in Redis (or a reset lost there).
    state = await drifted(http, worker, redis, "twice", 4000)
    raised_before = metrics.DRIFT_RAISED._value.get()
    assert await worker.drift.run_once() == 0
    assert metrics.DRIFT.labels("above")._value.get() == 3000
    assert metrics.DRIFT.labels("below")._value.get() == 0
    assert metrics.DRIFT_RAISED._value.get() == raised_before
    assert await redis.hget(state, "used") == b"4000"


async def test_drift_waits_while_settlements_are_unprocessed(
    http: httpx.AsyncClient, worker: Worker, redis: Redis
) -> None:
    assert (await commit(http, "busy", "a", 1000))[0] == 200
    await drain(worker)
    # An operator reset zeroes Redis; Postgres is set to 0 too, but a settlement before the
    # reset is still in the stream: raising now would undo the reset.
    headers = {"Authorization": "Bearer test-admin-token"}
    state = keys.user_keys("busy").state
    assert (await commit(http, "busy", "b", 500))[0] == 200
    reset = await http.post("/admin/v1/users/busy/reset", json={"reason": "t"}, headers=headers)
    assert reset.status_code == 200
    assert await worker.drift.run_once() == 0
    assert await redis.hget(state, "used") == b"0"
    await drain(worker)
    assert await worker.drift.run_once() == 0
    assert await redis.hget(state, "used") == b"0"


async def test_dead_consumers_are_forgotten_once_idle(worker: Worker, redis: Redis) -> None:
    stream = keys.settle_stream(0)
    await redis.xgroup_createconsumer(stream, keys.SETTLE_GROUP, "dead-worker")
    await redis.xadd(stream, {"k": "reset", "u": "x", "ps": "0", "t": "0"})
    await redis.xreadgroup(keys.SETTLE_GROUP, "busy-worker", {stream: ">"})
    assert await worker.streams.forget_idle_consumers(0) == 1  # busy-worker has one pending
    names = {c["name"] for c in await redis.xinfo_consumers(stream, keys.SETTLE_GROUP)}
    assert names == {b"busy-worker"}


async def test_held_tokens_sum_every_open_hold(
    http: httpx.AsyncClient, worker: Worker, redis: Redis
) -> None:
    """quota_held_tokens: the tokens on hold in all of Redis, whichever users hold them; a
    settled hold stops counting, and so does an early due score with nothing behind it."""
    for n, tokens in enumerate((300, 200, 50)):
        assert (await reserve(http, f"holder{n}", tokens, reservation_id=f"h{n}"))[0] == 200
    assert await held_tokens(redis) == 550
    assert metrics.HELD._value.get() == 550
    assert (await commit(http, "holder1", "h1", 10))[0] == 200  # its due score stays, early
    assert await held_tokens(redis) == 350
