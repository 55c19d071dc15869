"""Delivering usage alerts to ALERT_WEBHOOK_URL.

The alert rows are written in the settle transaction (one per user, period and threshold);
delivery works only from Postgres state (delivered_at, attempts), so it survives restarts and
any worker can do it. A row is locked (FOR UPDATE SKIP LOCKED) while its POST is in flight, so
two workers never send it at the same time; a failed attempt waits
min(backoff * (2^attempts - 1), backoff_max * attempts) after triggered_at before the next.
Every attempt sends the same `id`, so a receiver can drop a repeat (a crash after the POST and
before the commit of delivered_at sends it again).

After ALERT_WEBHOOK_ATTEMPTS_MAX failed attempts an alert is given up: never sent again, its row
left with delivered_at null. That loss is logged (error, with the alert's id) and counted
(quota_sync_alerts_total{outcome="given_up"}); setting `attempts` back to 0 sends it again.
"""

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

import httpx
import orjson
import psycopg

from quota_common.periods import rfc3339
from sync_worker import metrics

log = logging.getLogger("sync_worker.alerts")

# Alerts sent per pass (each pass holds their row locks until it has an answer for all).
DELIVER_BATCH_MAX = 50

DUE_ALERTS = """
SELECT id, user_id, threshold, "limit", used, period_start, period_end
FROM usage_alerts
WHERE delivered_at IS NULL
  AND attempts < %(attempts_max)s
  AND triggered_at + make_interval(secs => least(
        %(backoff_ms)s * (power(2, attempts) - 1), %(backoff_max_ms)s * attempts) / 1000.0)
      <= now()
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
MARK_ATTEMPTS = """
UPDATE usage_alerts
SET attempts = attempts + 1,
    delivered_at = CASE WHEN id = ANY(%(delivered)s::bigint[]) THEN now() END
WHERE id = ANY(%(ids)s::bigint[])
RETURNING id, user_id, threshold, attempts
"""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Stripe's scheme: hex HMAC-SHA256 of "<t>.<body>"."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def payload(row: tuple[Any, ...]) -> bytes:
    alert_id, user_id, threshold, limit, used, period_start, period_end = row
    return orjson.dumps(
        {
            "id": alert_id,
            "user_id": user_id,
            "threshold": threshold,
            "limit": limit,
            "used": used,
            "period_start": rfc3339(period_start),
            "period_end": rfc3339(period_end),
        }
    )


class AlertSender:
    def __init__(
        self,
        conninfo: str,
        url: str | None,
        secret: str | None,
        timeout_ms: int,
        backoff_ms: int,
        backoff_max_ms: int,
        attempts_max: int,
    ) -> None:
        self.conninfo = conninfo
        self.url = url
        self.secret = secret or ""
        self.params = {
            "attempts_max": attempts_max,
            "backoff_ms": backoff_ms,
            "backoff_max_ms": backoff_max_ms,
            "limit": DELIVER_BATCH_MAX,
        }
        self._http = httpx.AsyncClient(timeout=timeout_ms / 1000)
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        # Set when the settle step records new alerts, so they go out without waiting.
        self.wake = asyncio.Event()

    async def _connection(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=5, application_name="quota-sync-worker-alerts"
            )
        return self._conn

    async def _post(self, row: tuple[Any, ...]) -> bool:
        assert self.url is not None  # run_once returns early without a URL
        body = payload(row)
        headers = {
            "Content-Type": "application/json",
            "Quota-Signature": signature(self.secret, int(time.time()), body),
        }
        try:
            response = await self._http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as error:
            log.warning("alert webhook failed", extra={"id": row[0], "error": repr(error)})
            return False
        if response.is_success:
            return True
        log.warning("alert webhook refused", extra={"id": row[0], "status": response.status_code})
        return False

    async def run_once(self) -> int:
        """Sends the alerts that are due; returns how many were delivered."""
        if self.url is None:
            return 0
        conn = await self._connection()
        try:
            async with conn.transaction():
                rows = await (await conn.execute(DUE_ALERTS, self.params)).fetchall()
                if not rows:
                    return 0
                results = await asyncio.gather(*(self._post(row) for row in rows))
                delivered = [row[0] for row, ok in zip(rows, results, strict=True) if ok]
                marked = await conn.execute(
                    MARK_ATTEMPTS, {"ids": [row[0] for row in rows], "delivered": delivered}
                )
                given_up = [
                    row
                    for row in await marked.fetchall()
                    if row[0] not in delivered and row[3] >= self.params["attempts_max"]
                ]
        except psycopg.Error:
            await conn.close()
            self._conn = None
            raise
        metrics.ALERTS.labels("delivered").inc(len(delivered))
        if len(delivered) < len(rows):
            metrics.ALERTS.labels("failed").inc(len(rows) - len(delivered))
        for alert_id, user_id, threshold, attempts in given_up:
            log.error(
                "alert given up: never delivered",
                extra={
                    "id": alert_id,
                    "user_id": user_id,
                    "threshold": threshold,
                    "attempts": attempts,
                },
            )
        if given_up:
            metrics.ALERTS.labels("given_up").inc(len(given_up))
        return len(delivered)

    async def close(self) -> None:
        await self._http.aclose()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
