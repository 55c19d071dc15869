"""Script calls batched per event-loop turn.

Every script call that the requests of one loop turn make is written to Redis at once, as one
non-transactional pipeline, so a burst of requests costs one round trip instead of one each. Each
call is still its own atomic script: batching only shares the socket. A call whose script Redis
lost (NOSCRIPT) is sent again as EVAL with its source, which loads it.

On a single Redis the calls share one connection: redis-py opens it (address, TLS, AUTH, SELECT),
then `RedisLink` takes the socket over and hands each reply to its caller's future as it arrives,
in order, under one deadline per call. redis-py's pool, stream and parser layers cost more CPU per
call than the script itself; here a reply costs a hiredis parse and a future's result. On a
cluster, redis-py's cluster pipeline routes each call by its key.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from quota_common.scripts import AnyRedis, LuaScript
from sidecar.outage import master_of


@dataclass(slots=True)
class ScriptCall:
    script: LuaScript
    keys: Sequence[str]
    args: Sequence[Any]
    future: "asyncio.Future[Any]"
    deadline: float = 0.0


# Calls written to Redis and not answered yet, at most: a burst beyond waits for replies, so
# what is in flight always fits in a deadline (about 25 us of Redis each, 50 ms).
IN_FLIGHT_MAX = 512
# Replies meaning the server cannot take writes any more (now a replica after a failover, or
# its master is gone): a new connection, through the address again, may reach the new master.
RECONNECT_CODES = ("READONLY", "MASTERDOWN")


class RedisLink(asyncio.Protocol):
    """One Redis connection: calls are written as they come and replies matched to them in the
    order Redis answers. A call not answered by its deadline fails every call in flight and
    closes the link (a half-read reply must never answer the next call)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout_s: float, on_replies: Callable[[], None]
    ) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.on_replies = on_replies
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.in_flight: deque[ScriptCall] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.stream_writer: asyncio.StreamWriter | None = None

    @property
    def alive(self) -> bool:
        return self.transport is not None

    @property
    def room(self) -> int:
        return IN_FLIGHT_MAX - len(self.in_flight)

    def take_over(self, connection: AbstractConnection) -> None:
        """Moves a connected redis-py connection's socket to this protocol."""
        writer = connection._writer
        if writer is None:
            raise ConnectionError("the Redis connection closed during its handshake")
        # The connection object no longer owns the socket: it must not close it when collected.
        # The stream writer closes its transport when collected, so the link keeps it.
        connection._writer = connection._reader = None
        self.stream_writer = writer
        transport: Any = writer.transport
        transport.set_protocol(self)
        self.connection_made(transport)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Redis closed the connection: {exc or 'EOF'}"))

    def send(self, calls: list[ScriptCall]) -> None:
        if self.transport is None:
            raise ConnectionError("the Redis connection is closed")
        deadline = self.loop.time() + self.timeout_s
        for call in calls:
            call.deadline = deadline
        self.transport.write(
            b"".join(script_command(b"EVALSHA", c.script.sha_bytes, c.keys, c.args) for c in calls)
        )
        self.in_flight.extend(calls)
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self.check_deadline)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as error:
                self.fail(ConnectionError(f"Redis sent a malformed reply: {error}"))
                return
            if reply is False:
                break
            if not self.in_flight:
                self.fail(ConnectionError("Redis sent a reply nobody asked for"))
                return
            call = self.in_flight.popleft()
            if not isinstance(reply, ResponseError):
                settle(call.future, reply)
                continue
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                self.resend_with_source(call)
                continue
            settle(call.future, reply_or_failure(reply))
            if message.startswith(RECONNECT_CODES):
                self.fail(ConnectionError(f"Redis cannot take writes here: {message}"))
                return
        self.on_replies()

    def resend_with_source(self, call: ScriptCall) -> None:
        # NOSCRIPT means the script did not run: sending it again cannot apply it twice.
        assert self.transport is not None
        call.deadline = self.loop.time() + self.timeout_s
        source = call.script.source.encode()
        self.transport.write(script_command(b"EVAL", source, call.keys, call.args))
        self.in_flight.append(call)

    def check_deadline(self, confirmed: bool = False) -> None:
        self.timer = None
        if not self.in_flight:
            return
        deadline = self.in_flight[0].deadline
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self.check_deadline)
        elif not confirmed:
            # uvloop runs due timers before it reads sockets: after a stall of the loop the
            # replies may be waiting unread. A timer a millisecond on runs after the next read.
            self.timer = self.loop.call_later(0.001, self.check_deadline, True)
        else:
            self.fail(TimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))

    def fail(self, error: Exception) -> None:
        transport, self.transport = self.transport, None
        if transport is not None and not transport.is_closing():
            transport.abort()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.in_flight:
            settle(self.in_flight.popleft().future, error)


class ScriptPipeline:
    def __init__(self, redis: AnyRedis, timeout_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self.pending: list[ScriptCall] = []
        self.flush_scheduled = False
        # Looked up once: on Python 3.11 every get_running_loop() costs a getpid() syscall.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.link: RedisLink | None = None
        self.opening: asyncio.Task[None] | None = None
        self.cluster_batches: set[asyncio.Task[None]] = set()

    async def call(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append(ScriptCall(script, keys, args, future))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return await future

    def schedule_flush(self) -> None:
        """After replies: calls that waited for room in flight go now."""
        if self.pending and not self.flush_scheduled:
            self.flush_scheduled = True
            self.running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.pending:
            return
        if isinstance(self.redis, RedisCluster):
            calls, self.pending = self.pending, []
            # One pipeline per master, each under its own deadline: a hung master fails its
            # own calls only.
            by_master: dict[str, list[ScriptCall]] = {}
            for call in calls:
                by_master.setdefault(master_of(self.redis, call.keys[0]), []).append(call)
            for group in by_master.values():
                task = self.running_loop().create_task(self.over_cluster(group))
                # The loop keeps tasks weakly: a batch in flight must not be collected.
                self.cluster_batches.add(task)
                task.add_done_callback(self.cluster_batches.discard)
        elif self.link is not None and self.link.alive:
            room = self.link.room
            if room > 0:
                calls, self.pending = self.pending[:room], self.pending[room:]
                self.link.send(calls)
        elif self.opening is None:
            self.opening = self.running_loop().create_task(self.open_link())

    async def open_link(self) -> None:
        """Connects (the calls of the meantime wait in `pending`), then sends them."""
        try:
            self.link = await self.connected_link()
        except Exception as error:
            calls, self.pending = self.pending, []
            for call in calls:
                settle(call.future, error)
        finally:
            self.opening = None
        self.flush()

    async def connected_link(self) -> RedisLink:
        assert isinstance(self.redis, Redis)
        pool = self.redis.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        try:
            async with asyncio.timeout(self.timeout_s):
                await connection.connect_check_health(check_health=False)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        link = RedisLink(self.running_loop(), self.timeout_s, self.schedule_flush)
        link.take_over(connection)
        return link

    async def over_cluster(self, calls: list[ScriptCall]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        try:
            async with asyncio.timeout(self.timeout_s):
                results = await pipe.execute(raise_on_error=False)
                for call, result in zip(calls, results, strict=True):
                    if isinstance(result, NoScriptError):
                        result = await self.loaded_again(call)
                    settle(call.future, reply_or_failure(result))
        except Exception as error:
            for call in calls:
                settle(call.future, error)

    async def loaded_again(self, call: ScriptCall) -> Any:
        """The call after NOSCRIPT, with the script sent again; its error reply is its answer."""
        try:
            return await call.script(self.redis, list(call.keys), list(call.args))
        except ResponseError as error:
            return error

    def running_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop or asyncio.get_running_loop()

    async def connect(self) -> None:
        """Opens the connection ahead of the first requests, whose deadline is short."""
        if isinstance(self.redis, Redis) and self.link is None:
            self.link = await self.connected_link()

    async def aclose(self) -> None:
        if self.link is not None:
            self.link.fail(ConnectionError("the sidecar is shutting down"))


def script_command(verb: bytes, script: bytes, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    """EVAL or EVALSHA in the Redis protocol, packed by hiredis in C (5 us here, 12 in Python;
    redis-py's general encoder costs more than the rest of the call). Ints and strs are all the
    ledger passes."""
    command: bytes = hiredis.pack_command((verb, script, len(keys), *keys, *args))
    return command


class ScriptFailed(Exception):
    """A script raised an error: a bug of ours, not an outage. Deliberately not a RedisError,
    so the call is never taken for Redis being away (no breaker, no journal that would replay
    the same failing call forever)."""


# Error replies that mean "Redis cannot run this now" (memory, loading, failover, cluster).
UNAVAILABLE_CODES = frozenset(
    ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "MISCONF")
)


def reply_or_failure(reply: Any) -> Any:
    """An error raised inside a script becomes ScriptFailed; other replies pass unchanged."""
    if type(reply) is not ResponseError:
        return reply
    message = str(reply)
    if message.split(" ", 1)[0] in UNAVAILABLE_CODES or "@user_script" not in message:
        return reply
    return ScriptFailed(message)


def settle(future: "asyncio.Future[Any]", result: Any) -> None:
    """Hands a result to its caller; a caller that gave up (cancelled) is skipped."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
