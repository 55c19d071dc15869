"""Script calls batched per event-loop turn.

Every script call that the requests of one loop turn make is sent to Redis as one
non-transactional pipeline (in chunks), so a burst of requests costs a few round trips instead
of one each. Each call is still its own atomic script: batching only shares the socket. A call
whose script Redis lost (NOSCRIPT) is sent again on its own, which loads it.

On a single Redis the chunks go over a few connections this module owns, written and read
directly (redis-py's Connection and hiredis parser) under one deadline per chunk: the pool and
pipeline layers of redis-py cost more CPU than the script itself. On a cluster, redis-py's
cluster pipeline routes each call by its key.
"""

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

from quota_common.scripts import AnyRedis, LuaScript

# A chunk large enough to amortise a round trip, small enough that one slow chunk does not
# hold up a whole burst; a few chunks in flight keep Redis busy while Python parses answers.
CHUNK_CALLS_MAX = 32
CHUNKS_IN_FLIGHT_MAX = 4

Call = tuple[LuaScript, Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptPipeline:
    def __init__(self, redis: AnyRedis, timeout_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self.pending: list[Call] = []
        self.in_flight = 0
        self.flush_scheduled = False
        # Looked up once: on Python 3.11 every get_running_loop() costs a getpid() syscall.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle: list[AbstractConnection] = []
        if isinstance(redis, Redis):
            options = dict(redis.connection_pool.connection_kwargs)
            # The chunk's deadline replaces per-read timeouts (each costs a timer or a task).
            options.update(socket_timeout=None)
            connection_class = redis.connection_pool.connection_class
            self.idle = [connection_class(**options) for _ in range(CHUNKS_IN_FLIGHT_MAX)]

    async def call(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((script, keys, args, future))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self.flush_scheduled = False
        while self.pending and self.in_flight < CHUNKS_IN_FLIGHT_MAX:
            chunk = self.pending[:CHUNK_CALLS_MAX]
            del self.pending[:CHUNK_CALLS_MAX]
            self.in_flight += 1
            self.running_loop().create_task(self._send(chunk))

    async def _send(self, chunk: list[Call]) -> None:
        try:
            if isinstance(self.redis, RedisCluster):
                results = await self._over_cluster(chunk)
            else:
                results = await self._over_connection(chunk)
            for (script, keys, args, future), result in zip(chunk, results, strict=True):
                if isinstance(result, NoScriptError):
                    result = await script(self.redis, list(keys), list(args))
                settle(future, result)
        except Exception as error:
            for *_, future in chunk:
                if not future.done():
                    future.set_exception(error)
        finally:
            self.in_flight -= 1
            if self.pending and not self.flush_scheduled:
                self.flush_scheduled = True
                self.running_loop().call_soon(self._flush)

    async def _over_connection(self, chunk: list[Call]) -> list[Any]:
        connection = self.idle.pop()
        try:
            async with asyncio.timeout(self.timeout_s):
                packed = b"".join(
                    evalsha_command(script.sha_bytes, keys, args) for script, keys, args, _ in chunk
                )
                await connection.send_packed_command(packed, check_health=False)
                results: list[Any] = []
                for _ in chunk:
                    try:
                        results.append(await connection.read_response(disconnect_on_error=False))
                    except ResponseError as error:
                        results.append(error)
            return results
        except BaseException:
            # Half-read replies would answer the next chunk's calls: start afresh.
            await connection.disconnect(nowait=True)
            raise
        finally:
            self.idle.append(connection)

    async def _over_cluster(self, chunk: list[Call]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args, _ in chunk:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    def running_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop or asyncio.get_running_loop()

    async def connect(self) -> None:
        """Opens the owned connections ahead of the first requests, whose deadline is short."""
        for connection in self.idle:
            await connection.connect_check_health(check_health=False)

    async def aclose(self) -> None:
        for connection in self.idle:
            await connection.disconnect()


def evalsha_command(sha: bytes, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    """EVALSHA in the Redis protocol, written here: redis-py's general encoder cost more than
    the rest of the call. Arguments are str or int, as the ledger passes them."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args), sha)]
    count = str(len(keys)).encode()
    parts.append(b"$%d\r\n%s\r\n" % (len(count), count))
    for value in (*keys, *args):
        data = value.encode() if isinstance(value, str) else str(value).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def settle(future: "asyncio.Future[Any]", result: Any) -> None:
    """Hands a result to its caller; a caller that gave up (cancelled) is skipped."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
