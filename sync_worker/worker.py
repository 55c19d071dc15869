"""The sync worker: the settle loops (the ones that matter for "no lost usage") and their
companions, each a small loop around a `run_once()` that tests can call directly.

Writers: SYNC_WRITERS settle loops, each with its own Postgres connection, own a share of the
settle streams (stream i goes to writer i mod N). A user's settlements are all in one stream,
so the writers never touch the same rows and never wait on each other's locks; while one waits
for Postgres, another's batch is read and written (measured in docs/sync-worker.md).

Stopping: `stop()` (first SIGTERM) lets the settle loops finish and acknowledge the batches in
hand, then returns; while starting, or with nothing in hand, it returns at once. A store that
stays down keeps the batch from being written: after STOP_WRITE_GRACE_S of trying, the worker
stops anyway and the batch stays pending in Redis for the next worker (nothing is lost: it was
not acknowledged). A second SIGTERM cancels the worker at once (sync_worker.main).
"""

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import db, keys, redis_client
from quota_common.plans import catalogue
from quota_common.scripts import AnyRedis, register_all
from quota_common.settings import Settings
from sync_worker import metrics
from sync_worker.alerts import AlertSender
from sync_worker.drift import DriftRepair
from sync_worker.flush import Flusher
from sync_worker.plans import PlanSync
from sync_worker.reaper import Reaper, held_tokens
from sync_worker.settle import Settler
from sync_worker.streams import STREAMS, SettleStreams

log = logging.getLogger("sync_worker")

# Waits after consecutive failures grow to this, so an outage is not a busy loop.
ERROR_BACKOFF_MAX_S = 5.0
BACKLOG_INTERVAL_S = 1.0
# Allocations between young-generation collections (default 700), see tune_gc().
GC_THRESHOLD_OBJECTS = 100_000
# Dead workers' consumer entries are removed after this long idle with nothing pending.
CONSUMER_IDLE_FORGET_MS = 3_600_000
CONSUMER_SWEEP_INTERVAL_S = 300.0
# How often quota_held_tokens is summed (one Redis read per user with an open hold).
HELD_SAMPLE_INTERVAL_S = 15.0
ALERT_TICK_S = 1.0
# After the first SIGTERM, how long a batch whose store is down is tried before giving up.
STOP_WRITE_GRACE_S = 10.0


def tune_gc() -> None:
    """A batch makes hundreds of thousands of small lists and tuples that die together; with
    the default thresholds the cyclic collector ran so often it took half of the worker's CPU
    (measured here: 28k -> 45-60k events/s). Nothing here builds reference cycles worth chasing
    between batches, and the objects of the start (modules, settings) are frozen out of it."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_OBJECTS, 50, 100)


def libpq_url(database_url: str) -> str:
    """DATABASE_URL for psycopg itself (the SQLAlchemy dialect suffix removed)."""
    scheme, rest = database_url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else database_url


def consumer_name() -> str:
    """Unique per process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: AnyRedis | None = None,
        engine: AsyncEngine | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis or redis_client.connect(
            settings, timeout_s=settings.sync_redis_timeout_ms / 1000
        )
        self.engine = engine or db.async_engine(settings.database_url, pool_size=4)
        conninfo = libpq_url(settings.database_url)
        self.consumer = consumer_name()
        self.streams = SettleStreams(
            self.redis, self.consumer, settings.sync_batch_size, settings.sync_claim_idle_ms
        )
        self.alerts = AlertSender(
            conninfo,
            settings.alert_webhook_url,
            settings.alert_webhook_secret,
            settings.alert_webhook_timeout_ms,
            settings.alert_webhook_backoff_ms,
            settings.alert_webhook_backoff_max_ms,
            settings.alert_webhook_attempts_max,
        )
        writers = settings.sync_writers
        self.settlers = [
            Settler(
                SettleStreams(
                    self.redis,
                    self.consumer,
                    settings.sync_batch_size,
                    settings.sync_claim_idle_ms,
                    STREAMS[writer::writers],
                ),
                Flusher(conninfo),
                # Claim about twice per idle period: a dead worker's entries wait at most ~1.5x.
                claim_interval_s=settings.sync_claim_idle_ms / 2000,
                on_alerts=lambda _: self.alerts.wake.set(),
            )
            for writer in range(writers)
        ]
        self.plans = PlanSync(
            self.redis, self.engine, conninfo, catalogue(settings), settings.sync_plan_refresh_s
        )
        self.reaper = Reaper(self.redis)
        self.drift = DriftRepair(self.redis, self.engine, settings.sync_drift_window_s)
        self.server = metrics.MetricsServer(
            settings.sync_worker_host, settings.sync_worker_port, self.health, sock
        )
        self.started = False
        self._stopping = asyncio.Event()
        self._stop_deadline = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        metrics.LAST_SUCCESS.set_function(self.last_success)
        self._backlog = 0

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy once started and while the last settle step reached both stores: a worker
        that cannot write to Postgres (or read Redis) answers 503 "degraded"."""
        last = self.last_success()
        error = next((s.error for s in self.settlers if s.error), None)
        status = "degraded" if error else "ok"
        return self.started and not error, {
            "status": status if self.started else "starting",
            "consumer": self.consumer,
            "backlog_entries": self._backlog,
            "last_success_age_s": round(time.time() - last, 3) if last else None,
            "error": error,
        }

    async def start(self) -> bool:
        """Ready to work: groups exist, scripts loaded, plan changes heard. The full plan pass
        runs in the plans loop, so a large one never delays the settling of usage. False when
        asked to stop before that (a store down at start)."""
        tune_gc()
        if not await self._retry("start", self._start_once):
            return False
        self.started = True
        log.info("sync worker started", extra={"consumer": self.consumer})
        return True

    async def _start_once(self) -> None:
        await register_all(self.redis)
        for settler in self.settlers:
            await settler.start()
        await self.plans.listen()

    def last_success(self) -> float:
        """The oldest of the writers' last successes (0 until each has had one)."""
        return min(settler.last_success for settler in self.settlers)

    def settler_of(self, user_id: str) -> Settler:
        """The settle loop whose share holds this user's stream."""
        return self.settlers[keys.bucket_of(user_id) % len(self.settlers)]

    async def run_once(self) -> int:
        """One settle batch of every writer at once (the unit tests' entry point). Raises the
        first failure once every writer has finished its step, so none is left running."""
        steps = [settler.run_once() for settler in self.settlers]
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(n for n in results if isinstance(n, int))

    async def run(self) -> None:
        await self.server.start()
        try:
            if await self.start():
                await self._run_loops()
        finally:
            await self.close()

    async def _run_loops(self) -> None:
        loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "plans": self._plans_loop,
            "reaper": self._every(self.settings.sync_reap_interval_ms / 1000, self.reaper.run_once),
            "drift": self._every(self.settings.sync_drift_interval_s, self.drift.run_once),
            "alerts": self._alerts_loop,
            "backlog": self._every(BACKLOG_INTERVAL_S, self._measure_backlog),
            "consumers": self._every(CONSUMER_SWEEP_INTERVAL_S, self._forget_consumers),
            "held": self._every(HELD_SAMPLE_INTERVAL_S, self._sample_held),
        }
        self._tasks = [asyncio.create_task(loop(), name=name) for name, loop in loops.items()]
        try:
            await asyncio.gather(*(self._settle_loop(settler) for settler in self.settlers))
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + STOP_WRITE_GRACE_S
            self._stopping.set()

    async def close(self) -> None:
        await self.server.close()
        await self.plans.close()
        await self.alerts.close()
        for settler in self.settlers:
            await settler.flusher.close()
        await self.redis.aclose()
        await self.engine.dispose()

    async def _settle_loop(self, settler: Settler) -> None:
        failures = 0
        while not self._stopping.is_set() or settler.holding:
            try:
                # Once asked to stop, only what is already read is finished.
                written = await settler.run_once(read=not self._stopping.is_set())
                failures = 0
                settler.error = None
            except Exception as error:
                failures += 1
                settler.error = f"{type(error).__name__}: {str(error)[:200]}"
                log.warning("settle failed, batch kept", extra={"error": settler.error})
                backoff_s = min(ERROR_BACKOFF_MAX_S, 0.1 * 2**failures)
                if not self._stopping.is_set():
                    await self._pause(backoff_s)
                elif time.monotonic() + backoff_s < self._stop_deadline:
                    await asyncio.sleep(backoff_s)
                else:
                    log.warning("stopping with a batch unwritten: it stays pending in Redis")
                    return
                continue
            if written == 0:
                await self._pause(self.settings.sync_poll_interval_ms / 1000)

    async def _pause(self, seconds: float) -> None:
        """Waits, or less when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _retry(self, what: str, step: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Runs `step` until it succeeds (True), backing off after failures. Asked to stop, it
        gives up (False) and cancels the step in flight: only for steps that hold nothing to
        finish (the settle loop has its own)."""
        failures = 0
        stopping = asyncio.ensure_future(self._stopping.wait())
        attempt: asyncio.Future[Any] | None = None
        try:
            while not self._stopping.is_set():
                attempt = asyncio.ensure_future(step())
                await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not attempt.done():
                    return False
                error = attempt.exception()
                if error is None:
                    return True
                failures += 1
                log.warning(f"{what} failed", extra={"error": repr(error)[:300]})
                await self._pause(min(ERROR_BACKOFF_MAX_S, 0.1 * 2**failures))
            return False
        finally:
            stopping.cancel()
            if attempt is not None and not attempt.done():
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)

    async def _sample_held(self) -> None:
        await held_tokens(self.redis)

    def _every(
        self, interval_s: float, step: Callable[[], Coroutine[Any, Any, Any]]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def loop() -> None:
            while True:
                started = time.monotonic()
                if not await self._retry(step.__qualname__, step):
                    return
                await self._pause(max(0.0, interval_s - (time.monotonic() - started)))

        return loop

    async def _plans_loop(self) -> None:
        next_period_pass = time.monotonic() + self.settings.sync_plan_refresh_s
        while await self._retry("plans", self.plans.run_once):
            if time.monotonic() >= next_period_pass:
                await self._retry("plans period end", self.plans.period_end_pass)
                next_period_pass = time.monotonic() + self.settings.sync_plan_refresh_s

    async def _alerts_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.alerts.wake.wait(), ALERT_TICK_S)
            self.alerts.wake.clear()
            if not await self._retry("alerts", self.alerts.run_once):
                return

    async def _forget_consumers(self) -> None:
        await self.streams.forget_idle_consumers(
            max(CONSUMER_IDLE_FORGET_MS, 10 * self.settings.sync_claim_idle_ms)
        )

    async def _measure_backlog(self) -> None:
        try:
            self._backlog = await self.streams.backlog()
        except RedisError:
            return
        metrics.BACKLOG.set(self._backlog)
