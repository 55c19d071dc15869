"""Moving settled usage from the Redis streams into Postgres, one batch at a time.

Order of one batch: read (new entries, and from time to time entries a dead worker left
pending) -> one Postgres transaction -> XACK + XDEL. Nothing leaves Redis before the commit; a
batch whose transaction fails stays in memory and is written again (Postgres down: it waits,
and the rest of the backlog waits in Redis). If this process dies, its pending entries are
claimed by another worker after SYNC_CLAIM_IDLE_MS.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors

from sync_worker import metrics
from sync_worker.flush import Batch, Flusher, build_batch, sanitize, stream_position
from sync_worker.streams import Entry, ReadResult, SettleStreams

log = logging.getLogger("sync_worker.settle")

# How often an idle worker checks that Postgres answers.
IDLE_CHECK_INTERVAL_S = 1.0


@dataclass(slots=True)
class Held:
    """A batch between its read and its acknowledgement."""

    entries: list[Entry]
    batch: Batch
    committed: bool = False


class Settler:
    def __init__(
        self,
        streams: SettleStreams,
        flusher: Flusher,
        claim_interval_s: float,
        on_alerts: Callable[[int], None] | None = None,
    ) -> None:
        self.streams = streams
        self.flusher = flusher
        self.claim_interval_s = claim_interval_s
        self.on_alerts = on_alerts
        self._held: Held | None = None
        # The next batch, read while Postgres writes this one: Redis and Python work overlap
        # with the Postgres statement instead of adding to it.
        self._prefetch: asyncio.Task[Held | None] | None = None
        # The acknowledgement of the last committed batch, sent while the next one is written.
        self._acking: asyncio.Task[None] | None = None
        self._ack_entries: list[Entry] = []
        self._next_claim = 0.0
        self._next_idle_check = 0.0
        # Unix time of this loop's last batch committed, or idle check Postgres answered.
        self.last_success = 0.0
        # The failure of the last step, set by the loop that runs this one (/healthz).
        self.error: str | None = None

    async def start(self) -> None:
        await self.streams.ensure_groups()

    async def run_once(self, read: bool = True) -> int:
        """Writes one batch; returns how many stream entries it took out of Redis (0 when the
        streams were empty). Raises on a Redis or Postgres failure, keeping the batch.
        With read=False (stopping) only what was already read is finished."""
        if self._held is None:
            prefetch, self._prefetch = self._prefetch, None
            if prefetch is not None:
                self._held = await prefetch
            elif read:
                self._held = await self.read()
            if self._held is None:
                await self._finish_ack()
                if read:
                    await self._idle_check()
                return 0
        held = self._held
        if not held.committed:
            if (
                read
                and self._prefetch is None
                and len(held.entries) >= self.streams.batch_size // 2
            ):
                self._prefetch = asyncio.create_task(self.read())
            # On failure the read-ahead batch is kept for after this one (nothing is lost
            # either way: its entries stay pending in Redis until acknowledged).
            await self.write(held)
            held.committed = True
        # The previous batch's acknowledgement ran while this one was written; this batch's
        # runs during the next write. Both only ever follow their own commit.
        await self._finish_ack()
        self._ack_entries = held.entries
        self._acking = asyncio.create_task(self.streams.ack(held.entries))
        self._held = None
        self.last_success = time.time()
        return len(held.entries)

    async def _finish_ack(self) -> None:
        """Waits for the acknowledgement in flight; a failed one is sent again (raising, with
        the entries kept for the next call, if Redis still refuses)."""
        task, self._acking = self._acking, None
        if task is not None:
            try:
                await task
                self._ack_entries = []
            except Exception:
                log.warning("acknowledgement failed, sending it again")
        if self._ack_entries:
            await self.streams.ack(self._ack_entries)
            self._ack_entries = []

    async def _idle_check(self) -> None:
        """With nothing to write, Postgres is asked once a second whether it answers: only then
        is the success timestamp moved, so an outage shows even when no usage is waiting."""
        now = time.monotonic()
        if now < self._next_idle_check:
            return
        try:
            await self.flusher.ping()
        except psycopg.Error:
            await self.flusher.reset_connection()
            raise
        self._next_idle_check = now + IDLE_CHECK_INTERVAL_S
        self.last_success = time.time()

    @property
    def holding(self) -> bool:
        """Something read is not yet written and acknowledged."""
        return (
            self._held is not None
            or self._prefetch is not None
            or self._acking is not None
            or bool(self._ack_entries)
        )

    async def read(self) -> Held | None:
        entries: list[Entry] = []
        claimed = ReadResult()
        now = time.monotonic()
        if now >= self._next_claim:
            claimed = await self.streams.claim()
            self._next_claim = now + self.claim_interval_s
            if claimed.claimed:
                metrics.CLAIMED.inc(claimed.claimed)
                log.info("claimed stale entries", extra={"entries": claimed.claimed})
            entries.extend(claimed.entries)
        entries.extend((await self.streams.read()).entries)
        if not entries:
            return None
        if len(entries) > len(claimed.entries) > 0:
            # Claimed and new entries of one stream interleave: stream order is id order.
            entries.sort(key=lambda e: (e[0], stream_position(e[1])))
        return Held(entries, build_batch(entries))

    async def write(self, held: Held) -> None:
        started = time.perf_counter()
        try:
            recorded = await self.flusher.write(held.batch)
        except pg_errors.DataError:
            await self.flusher.reset_connection()
            metrics.FLUSH_ERRORS.inc()
            sanitize(held.batch)
            recorded = await self.flusher.write(held.batch)
        except psycopg.Error:
            metrics.FLUSH_ERRORS.inc()
            await self.flusher.reset_connection()
            raise
        metrics.FLUSH_DURATION.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(held.entries))
        for kind, count in held.batch.kinds.items():
            metrics.EVENTS.labels(kind).inc(count)
        if recorded:
            metrics.ALERTS.labels("recorded").inc(recorded)
            if self.on_alerts is not None:
                self.on_alerts(recorded)
