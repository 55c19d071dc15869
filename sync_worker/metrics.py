"""Prometheus metrics of the sync worker (every name `quota_sync_<thing>_<unit>`, apart from the
sidecar's) and the small HTTP server that serves them with /healthz."""

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from quota_common.metrics import only_quota_metrics

only_quota_metrics()

EVENTS = Counter(
    "quota_sync_events_total",
    "Stream entries written to Postgres, by kind (committed, refunded, expired, alert, reset).",
    ["kind"],
)
FLUSH_DURATION = Histogram(
    "quota_sync_flush_duration_seconds",
    "Time of one batch's Postgres transaction, from COPY to commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_SIZE = Histogram(
    "quota_sync_batch_entries",
    "Entries per flushed batch.",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
FLUSH_ERRORS = Counter(
    "quota_sync_flush_errors_total",
    "Batches whose Postgres transaction failed (kept in Redis and tried again).",
)
BACKLOG = Gauge(
    "quota_sync_backlog_entries",
    "Entries in the settle streams not yet written to Postgres (all buckets).",
)
LAST_SUCCESS = Gauge(
    "quota_sync_last_success_timestamp_seconds",
    "Unix time of the last batch committed to Postgres, or of the last idle check that"
    " Postgres answered (once a second while the streams are empty), of the writer whose"
    " last success is the oldest: one stuck writer shows.",
)
CLAIMED = Counter(
    "quota_sync_claimed_entries_total",
    "Pending entries of a stalled or dead worker taken over by this one.",
)
REAPED = Counter("quota_sync_reaped_users_total", "Users whose expired holds the reaper settled.")
HELD = Gauge(
    "quota_held_tokens",
    "Tokens on hold right now in all of Redis (the sum of every user's `reserved`), sampled.",
)
PLANS_APPLIED = Counter(
    "quota_sync_plans_applied_total",
    "Plan pushes from Postgres into Redis, by trigger (notify, start, period_end).",
    ["trigger"],
)
DRIFT = Gauge(
    "quota_sync_drift_tokens",
    "Tokens by which Redis `used` differed from Postgres in the last drift pass, summed over"
    " users, by direction: below (then raised to Postgres) or above (left alone, never lowered).",
    ["direction"],
)
DRIFT_RAISED = Counter(
    "quota_sync_drift_raised_tokens_total",
    "Tokens added to Redis `used` to bring it back up to Postgres.",
)
ALERTS = Counter(
    "quota_sync_alerts_total",
    "Usage alerts by outcome: recorded, delivered, failed (an attempt; retried), given_up"
    " (ALERT_WEBHOOK_ATTEMPTS_MAX attempts failed: never sent).",
    ["outcome"],
)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]

REQUEST_BYTES_MAX = 8192


class MetricsServer:
    """GET /metrics and GET /healthz on a plain asyncio server: two routes do not need a
    framework, and the worker stays one event loop without a second HTTP stack."""

    def __init__(
        self, host: str, port: int, health: HealthFn, sock: socket.socket | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.health = health
        # Bound by quota-sync-worker before the worker starts (one line when it cannot be).
        self.sock = sock
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=self.sock)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        # Port 0 asks the OS for a free port: remember which one, for logs and tests.
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, path, _ = head[:REQUEST_BYTES_MAX].split(b"\r\n", 1)[0].split(b" ", 2)
            status, content_type, body = self._answer(method, path.split(b"?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, method: bytes, path: bytes) -> tuple[str, str, bytes]:
        if method != b"GET":
            return "405 Method Not Allowed", "application/json", b'{"error":"method"}'
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        if path == b"/healthz":
            healthy, details = self.health()
            status = "200 OK" if healthy else "503 Service Unavailable"
            return status, "application/json", orjson.dumps(details)
        return "404 Not Found", "application/json", b'{"error":"not_found"}'
