"""Script calls batched per event-loop turn.

Every script call that the requests of one loop turn make is sent to Redis as one
non-transactional pipeline (in chunks), so a burst of requests costs a few round trips and a few
connections instead of one each. Each call is still its own atomic script: batching only shares
the socket. A call whose script Redis lost (NOSCRIPT) is sent again on its own, which loads it.
"""

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from quota_common.scripts import AnyRedis, LuaScript

# A chunk large enough to amortise a round trip, small enough that one slow chunk does not
# hold up a whole burst; a few chunks in flight keep Redis busy while Python parses answers.
CHUNK_CALLS_MAX = 32
CHUNKS_IN_FLIGHT_MAX = 4

Call = tuple[LuaScript, Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptPipeline:
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self.pending: list[Call] = []
        self.in_flight = 0
        self.flush_scheduled = False

    async def call(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
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
            asyncio.get_running_loop().create_task(self._send(chunk))

    async def _send(self, chunk: list[Call]) -> None:
        try:
            if len(chunk) == 1:
                script, keys, args, future = chunk[0]
                settle(future, await script(self.redis, list(keys), list(args)))
                return
            pipe = self.redis.pipeline(transaction=False)
            for script, keys, args, _ in chunk:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
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
                asyncio.get_running_loop().call_soon(self._flush)


def settle(future: "asyncio.Future[Any]", result: Any) -> None:
    """Hands a result to its caller; a caller that gave up (cancelled) is skipped."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
