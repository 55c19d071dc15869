"""The Redis side of the hand-off: reading the settle streams of every bucket through one
consumer group, taking over entries a dead worker left pending, acknowledging after Postgres.

Each bucket has its own stream (its hash tag keeps it on its users' slot), so every command
here names one stream and a pipeline of them runs on a single Redis and on a cluster alike.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from quota_common import keys
from quota_common.scripts import SCRIPTS, AnyRedis

log = logging.getLogger("sync_worker.streams")

STREAMS = tuple(keys.settle_stream(bucket) for bucket in range(keys.BUCKETS))
# Fewer entries per stream than this per read costs more round trips than it saves memory.
READ_COUNT_MIN = 16
# A batch grows over at most this many reads (streams that filled their count are read again).
READ_ROUNDS_MAX = 8


# One stream entry as Redis sent it: (stream, entry id, fields), the fields a flat
# [name, value, ...] list of bytes read by position on the hot path (flush.build_batch). A
# plain tuple: a NamedTuple per entry costs a Python-level constructor call.
Entry = tuple[str, bytes, list[bytes]]


@dataclass(slots=True)
class ReadResult:
    entries: list[Entry] = field(default_factory=list)
    claimed: int = 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(response: Any, **options: Any) -> Any:
    return response


class SettleStreams:
    """The settle streams of `streams` (all by default): a worker's writers each read and claim
    their own share; the sweeps over consumers and the backlog look at every stream."""

    def __init__(
        self,
        redis: AnyRedis,
        consumer: str,
        batch_size: int,
        claim_idle_ms: int,
        streams: tuple[str, ...] = STREAMS,
    ):
        self.redis = redis
        # Entries as the protocol parser made them: redis-py's own parsing into dicts costs
        # more than the rest of the read (the worker owns this client).
        for command in ("XREADGROUP", "XAUTOCLAIM"):
            redis.set_response_callback(command, _raw)
        self.consumer = consumer
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        # XAUTOCLAIM cursor of each stream, so a long pending list is walked, not restarted.
        self.streams = streams
        self._claim_cursor: dict[str, str] = dict.fromkeys(streams, "0-0")

    async def ensure_groups(self, streams: tuple[str, ...] | list[str] | None = None) -> None:
        """Creates the consumer group of every stream (and the stream) from the first entry;
        a group that exists already is left alone, whatever it has read."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams if streams is None else streams:
            pipe.xgroup_create(stream, keys.SETTLE_GROUP, id="0", mkstream=True)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise result

    async def read(self) -> ReadResult:
        """New entries of every stream of this share, at most about batch_size in all: each
        stream gets an even share, and streams that filled theirs are read again while room
        is left."""
        result = ReadResult()
        streams = list(self.streams)
        count = max(READ_COUNT_MIN, self.batch_size // len(streams))
        for _ in range(READ_ROUNDS_MAX):
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xreadgroup(keys.SETTLE_GROUP, self.consumer, {stream: ">"}, count=count)
            answers = await pipe.execute(raise_on_error=False)
            full: list[str] = []
            missing_groups: list[str] = []
            for stream, answer in zip(streams, answers, strict=True):
                if isinstance(answer, ResponseError):
                    if "NOGROUP" in str(answer):
                        # Redis lost the stream and its group (a flush, a restart without
                        # persistence): start over from whatever the stream holds now.
                        missing_groups.append(stream)
                        continue
                    raise answer
                got = self._entries(stream, answer)
                result.entries.extend(got)
                if len(got) >= count:
                    full.append(stream)
            if missing_groups:
                log.warning("settle groups recreated", extra={"streams": len(missing_groups)})
                await self.ensure_groups(missing_groups)
            room = self.batch_size - len(result.entries)
            if not full or room <= 0:
                break
            streams = full
            count = max(READ_COUNT_MIN, room // len(full))
        return result

    async def claim(self) -> ReadResult:
        """Takes over entries pending longer than claim_idle_ms with another consumer (a
        worker that died or hangs). Postgres writes are idempotent, so a slow worker that
        finishes after all costs nothing but time."""
        result = ReadResult()
        count = max(READ_COUNT_MIN, self.batch_size // len(self.streams))
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xautoclaim(
                stream,
                keys.SETTLE_GROUP,
                self.consumer,
                self.claim_idle_ms,
                start_id=self._claim_cursor[stream],
                count=count,
            )
        answers = await pipe.execute(raise_on_error=False)
        for stream, answer in zip(self.streams, answers, strict=True):
            if isinstance(answer, ResponseError):
                if "NOGROUP" in str(answer):
                    continue
                raise answer
            cursor, claimed = answer[0], answer[1]
            self._claim_cursor[stream] = _text(cursor)
            # Entries deleted while pending come back apart (Redis also drops them from the
            # pending list in the same call); live ones become ours now.
            entries = [(stream, entry_id, fields) for entry_id, fields in claimed if fields]
            result.entries.extend(entries)
        result.claimed = len(result.entries)
        return result

    async def ack(self, entries: list[Entry]) -> None:
        """Acknowledges and deletes entries whose Postgres transaction has committed. Deleting
        only these ids never drops an entry that was not processed."""
        by_stream: dict[str, list[bytes]] = {}
        for stream, entry_id, _ in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        # XACK then XDEL in one script per stream: the ids cross the wire (and redis-py's
        # command packing, the costly part) once instead of twice.
        ack = SCRIPTS["settled_ack"]
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.execute_command("EVALSHA", ack.sha, 1, stream, keys.SETTLE_GROUP, *ids)
        answers = await pipe.execute(raise_on_error=False)
        for (stream, ids), answer in zip(by_stream.items(), answers, strict=True):
            if isinstance(answer, NoScriptError):
                await ack(self.redis, [stream], [keys.SETTLE_GROUP, *ids])
            elif isinstance(answer, Exception):
                raise answer

    async def forget_idle_consumers(self, idle_ms: int) -> int:
        """Removes consumers with nothing pending that have been idle for idle_ms (workers
        that died or stopped): each kill would otherwise leave one behind in every stream.
        A live one removed by mistake is created again by its next read."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in STREAMS:
            pipe.xinfo_consumers(stream, keys.SETTLE_GROUP)
        answers = await pipe.execute(raise_on_error=False)
        pipe = self.redis.pipeline(transaction=False)
        for stream, consumers in zip(STREAMS, answers, strict=True):
            if isinstance(consumers, ResponseError):
                continue
            for consumer in consumers:
                name = _text(consumer["name"])
                if (
                    name != self.consumer
                    and int(consumer["pending"]) == 0
                    and int(consumer["idle"]) >= idle_ms
                ):
                    pipe.xgroup_delconsumer(stream, keys.SETTLE_GROUP, name)
        forgotten = len(pipe)
        if forgotten:
            await pipe.execute()
        return forgotten

    async def backlog(self) -> int:
        """Entries not yet written to Postgres (processed ones are deleted)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in STREAMS:
            pipe.xlen(stream)
        return sum(int(n) for n in await pipe.execute())

    @staticmethod
    def _entries(stream: str, answer: Any) -> list[Entry]:
        if not answer:
            return []
        # RESP3: {stream: [[id, fields], ...]}; RESP2: [[stream, [[id, fields], ...]]].
        items = next(iter(answer.values())) if isinstance(answer, dict) else answer[0][1]
        return [(stream, entry_id, fields) for entry_id, fields in items if fields]
