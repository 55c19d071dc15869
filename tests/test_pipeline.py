"""The sidecar's Redis pipeline (sidecar/pipeline.py) on its own, against real Redis: replies
matched to calls, the cap on calls in flight, and deadlines that a stalled event loop does not
turn into failures of replies that had already arrived."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
import uvloop
from redis.asyncio import Redis

from quota_common.keys import user_keys
from quota_common.scripts import SCRIPTS, register_all
from sidecar import pipeline
from sidecar.pipeline import ScriptPipeline
from tests.conftest import REDIS_URL
from tests.servers import eventually
from tests.test_lua_scripts import seed

USERS = 50


@pytest.fixture
async def redis_seeded(redis: Redis) -> None:
    await register_all(redis)
    for n in range(USERS):
        await seed(redis, f"p{n}")


@pytest.fixture
async def calls(redis_seeded: None) -> AsyncIterator[ScriptPipeline]:
    store = Redis.from_url(REDIS_URL)
    script_pipeline = ScriptPipeline(store, timeout_s=0.05)
    await script_pipeline.connect()
    yield script_pipeline
    await script_pipeline.aclose()
    await store.aclose()


async def usage(calls: ScriptPipeline, n: int) -> list[object]:
    user = user_keys(f"p{n}")
    keys = user.state_keys()
    reply: list[object] = await calls.call(
        SCRIPTS["usage"], keys, [user.user_id, user.record_prefix]
    )
    return reply


async def test_thousands_of_calls_at_once_each_get_their_own_answer(
    calls: ScriptPipeline,
) -> None:
    in_flight_seen = 0

    async def one(i: int) -> bytes:
        nonlocal in_flight_seen
        assert calls.link is not None
        in_flight_seen = max(in_flight_seen, len(calls.link.in_flight))
        reply = await usage(calls, i % USERS)
        answer = reply[1]
        assert isinstance(answer, bytes)
        return answer

    answers = await asyncio.gather(*(one(i) for i in range(3000)))
    assert all(answer.startswith(b"FREE|") for answer in answers)
    assert calls.link is not None and not calls.link.in_flight
    assert in_flight_seen <= pipeline.IN_FLIGHT_MAX


def written(calls: ScriptPipeline) -> bool:
    """A call is on its way to Redis: written to the link, its reply not read yet."""
    return calls.link is not None and bool(calls.link.in_flight)


def test_a_stalled_loop_does_not_fail_replies_that_arrived_meanwhile(redis_seeded: None) -> None:
    """Another socket's callback blocks the loop past the 50 ms deadline right after a call is
    written, and Redis answers meanwhile (a long garbage collection does that in production).
    uvloop, the sidecar's loop (so this test runs on its own), runs a due timer before it reads
    the sockets again: the call must still get its reply, not a timeout."""

    def stall(sock: socket.socket) -> None:
        sock.recv(1)
        time.sleep(0.2)  # the stall itself: blocking the loop is the fault

    async def scenario() -> object:
        store = Redis.from_url(REDIS_URL)
        calls = ScriptPipeline(store, timeout_s=0.05)
        await calls.connect()
        loop = asyncio.get_running_loop()
        other, wake = socket.socketpair()
        loop.add_reader(other, stall, other)
        # Redis kept busy for 20 ms by another client, so the reply comes after the next poll.
        busy = socket.create_connection(("127.0.0.1", 6379))
        try:
            busy.sendall(b"DEBUG SLEEP 0.02\r\n")
            pending = asyncio.ensure_future(usage(calls, 0))
            # Queued, then written by the flush of the next loop turn: checked every turn, so
            # the stall still starts before Redis (busy for 20 ms) can answer.
            await eventually(lambda: written(calls), 1, "the call written", interval_s=0)
            wake.send(b"x")  # the stall starts with the next poll, before the reply is there
            return (await pending)[0]
        finally:
            busy.close()
            loop.remove_reader(other)
            other.close()
            wake.close()
            await calls.aclose()
            await store.aclose()

    assert uvloop.run(scenario()) == 0
