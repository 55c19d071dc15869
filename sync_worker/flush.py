"""The Postgres side of the hand-off: one transaction per batch writes the usage events, the
per-period totals and the alerts, so a batch counts completely or not at all.

Exactly once without a dedupe marker: the events insert is idempotent on (user_id,
reservation_id), and only rows it really inserted or changed (RETURNING inside the same
statement) add to the totals. A redelivered entry therefore changes nothing, however often it
comes back, and a crash before the commit leaves nothing behind.

Resets: every event carries its stream position, and a period's total records the position of
its last reset; only events after it count, so a settlement from before a reset that reaches
Postgres late (a second worker, a worker killed and its entries claimed) never undoes it.

Hot path: text COPY of the batch into a temporary table, then one INSERT ... ON CONFLICT for
the events and the totals together (see docs/sync-worker.md for the numbers).
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import psycopg

from sync_worker.streams import Entry

log = logging.getLogger("sync_worker.flush")

SETTLEMENT_KINDS = frozenset({b"committed", b"refunded", b"expired"})
COMMITTED = b"committed"
# Field order of every settlement entry (lua/_prelude.lua sweep_expired, commit.lua,
# refund.lua): read by position, checked by name.
SETTLEMENT_FIELDS = [b"k", b"u", b"r", b"tr", b"tc", b"l", b"md", b"t", b"ps"]

CREATE_STAGE = """
CREATE TEMPORARY TABLE IF NOT EXISTS sync_settled (
    user_id text NOT NULL,
    reservation_id text NOT NULL,
    status text NOT NULL,
    tokens_reserved bigint NOT NULL,
    tokens_charged bigint NOT NULL,
    late boolean NOT NULL,
    metadata text NOT NULL,
    settled_ms bigint NOT NULL,
    period_s bigint NOT NULL,
    stream_position bigint NOT NULL
) ON COMMIT DELETE ROWS
"""
# Text COPY: the entries' values are already the text Postgres parses ("1"/"0" is a boolean),
# so a row is one join of bytes; only the stream position is computed (see stream_position).
COPY_STAGE = (
    "COPY sync_settled (user_id, reservation_id, status, tokens_reserved, tokens_charged, late,"
    " metadata, settled_ms, period_s, stream_position) FROM STDIN"
)

# A late commit replaces the `expired` row of its reservation; a committed row never changes.
# Totals add what the events statement really changed, and after a reset of the period only
# what was settled after it (stream position), whenever and by whichever worker it is written.
# The reset position is read with the statement's snapshot, from the totals that have one (a
# partial index, as small as resets are rare). A reset committed meanwhile by another worker
# or the operator endpoint shows in the row this statement updates (`t`): the addition is then
# taken again from the changed rows, against that newer position.
WRITE_EVENTS = """
WITH changed AS (
    INSERT INTO usage_events AS e (user_id, reservation_id, status, tokens_reserved,
        tokens_charged, late, metadata, period_start, settled_at, stream_position)
    SELECT user_id, reservation_id, status, tokens_reserved, tokens_charged, late,
        CASE WHEN metadata = '' THEN '{}'::jsonb ELSE metadata::jsonb END,
        to_timestamp(period_s), timestamptz 'epoch' + settled_ms * interval '1 millisecond',
        stream_position
    FROM sync_settled
    ORDER BY user_id, reservation_id
    ON CONFLICT (user_id, reservation_id) DO UPDATE SET
        status = excluded.status,
        tokens_charged = excluded.tokens_charged,
        late = excluded.late,
        metadata = excluded.metadata,
        period_start = excluded.period_start,
        settled_at = excluded.settled_at,
        stream_position = excluded.stream_position,
        recorded_at = now()
    WHERE e.status <> 'committed' AND excluded.status = 'committed'
    RETURNING e.user_id, e.period_start, e.tokens_charged, e.stream_position
), added AS (
    INSERT INTO usage_totals AS t (user_id, period_start, tokens_charged, reset_position)
    SELECT c.user_id, c.period_start, sum(c.tokens_charged), r.reset_position
    FROM changed c
    LEFT JOIN usage_totals r ON r.user_id = c.user_id AND r.period_start = c.period_start
        AND r.reset_position IS NOT NULL
    WHERE c.tokens_charged > 0 AND c.stream_position > coalesce(r.reset_position, -1)
    GROUP BY c.user_id, c.period_start, r.reset_position
    ORDER BY c.user_id, c.period_start
    ON CONFLICT (user_id, period_start) DO UPDATE SET
        tokens_charged = t.tokens_charged + CASE
            WHEN t.reset_position IS NOT DISTINCT FROM excluded.reset_position
                THEN excluded.tokens_charged
            ELSE (SELECT coalesce(sum(n.tokens_charged), 0) FROM changed n
                WHERE n.user_id = t.user_id AND n.period_start = t.period_start
                  AND n.stream_position > t.reset_position)
        END,
        updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM added)
"""

# A reset makes the period's total the charges settled after it in stream order, recomputed
# from the events, and records its position so that no later write adds an earlier event. The
# same reset applied again (redelivery, a second worker) gives the same total; an older one
# (a reset redelivered after a newer one was recorded) changes nothing. The row exists and is
# locked before the sum is read, so a concurrent worker's addition lands either in the sum or
# after it (then against this position).
ENSURE_TOTAL = """
INSERT INTO usage_totals (user_id, period_start, tokens_charged)
VALUES (%(user_id)s, to_timestamp(%(period_s)s), 0)
ON CONFLICT (user_id, period_start) DO NOTHING
"""
LOCK_TOTAL = """
SELECT 1 FROM usage_totals
WHERE user_id = %(user_id)s AND period_start = to_timestamp(%(period_s)s)
FOR UPDATE
"""
RESET_TOTAL = """
UPDATE usage_totals AS t SET
    tokens_charged = (
        SELECT coalesce(sum(e.tokens_charged), 0) FROM usage_events e
        WHERE e.user_id = t.user_id AND e.period_start = t.period_start
          AND e.status = 'committed'
          AND e.stream_position > stream_entry_position(%(entry_id)s)),
    reset_position = stream_entry_position(%(entry_id)s),
    updated_at = now()
WHERE t.user_id = %(user_id)s AND t.period_start = to_timestamp(%(period_s)s)
  AND coalesce(t.reset_position, -1) <= stream_entry_position(%(entry_id)s)
"""

INSERT_ALERTS = """
INSERT INTO usage_alerts (user_id, threshold, period_start, period_end, "limit", used,
    triggered_at)
SELECT u, th, to_timestamp(ps), to_timestamp(pe), lim, used,
    timestamptz 'epoch' + t * interval '1 millisecond'
FROM unnest(%(users)s::text[], %(thresholds)s::int[], %(ps)s::bigint[], %(pe)s::bigint[],
    %(limits)s::bigint[], %(used)s::bigint[], %(t)s::bigint[]) AS a(u, th, ps, pe, lim, used, t)
ON CONFLICT ON CONSTRAINT uq_usage_alerts_once DO NOTHING
RETURNING id
"""


@dataclass(slots=True)
class Reset:
    user_id: str
    period_s: int
    # The reset's own stream entry id: its position among the user's settlements.
    entry_id: str


# One settlement: the values of SETTLEMENT_FIELDS in order (k, u, r, tr, tc, l, md, t, ps),
# then the stream entry id.
Row = list[bytes]


@dataclass(slots=True)
class Batch:
    """A read batch turned into rows: one per (user, reservation), in stream order, and the
    rows already in COPY text: built with the read, which overlaps the previous batch's
    statement, rather than with the write, which Postgres would wait for."""

    rows: dict[tuple[bytes, bytes], Row]
    alerts: list[tuple[str, int, int, int, int, int, int]]
    resets: dict[tuple[str, int], Reset]
    kinds: dict[str, int]
    copy: bytes


def _named(fields: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(fields[0::2], fields[1::2], strict=True))


def build_batch(entries: list[Entry]) -> Batch:
    """Parses entries in stream order. A reservation seen twice (expired, then committed
    late) keeps its commit; a duplicate of the same entry changes nothing."""
    rows: dict[tuple[bytes, bytes], Row] = {}
    alerts: list[tuple[str, int, int, int, int, int, int]] = []
    resets: dict[tuple[str, int], Reset] = {}
    kinds: dict[bytes, int] = {}
    for entry in entries:
        f = entry[2]
        kind = f[1] if len(f) > 1 else b""
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind in SETTLEMENT_KINDS:
            row = f[1::2]
            if f[0::2] != SETTLEMENT_FIELDS:
                named = _named(f)
                row = [named.get(name, b"") for name in SETTLEMENT_FIELDS]
            row.append(entry[1])
            key = (row[1], row[2])
            previous = rows.get(key)
            if previous is not None:
                if previous[0] == COMMITTED or kind != COMMITTED:
                    continue
                # The late commit replaces the expiry but keeps the tokens that were held.
                row[3] = previous[3]
            rows[key] = row
        elif kind == b"alert":
            a = _named(f)
            alerts.append(
                (
                    a[b"u"].decode(),
                    int(a[b"th"]),
                    int(a[b"ps"]),
                    int(a[b"pe"]),
                    int(a[b"lim"]),
                    int(a[b"used"]),
                    int(a[b"t"]),
                )
            )
        elif kind == b"reset":
            r = _named(f)
            user_id, period_s = r[b"u"].decode(), int(r[b"ps"])
            # A later reset of the same period supersedes an earlier one.
            resets[(user_id, period_s)] = Reset(user_id, period_s, entry[1].decode())
        else:
            log.error("unknown settle entry skipped", extra={"entry": entry[1].decode()})
    kind_counts = {k.decode(): n for k, n in kinds.items()}
    return Batch(rows, alerts, resets, kind_counts, copy_text(rows.values()))


# Caps of Postgres' stream_entry_position() (migration 0003), which keep a position in a bigint.
POSITION_MS_MAX = 9_223_372_036_853
POSITION_SEQ_MAX = 999_999


def stream_position(entry_id: bytes) -> int:
    """A stream entry id "<ms>-<seq>" as one number in stream order: Postgres'
    stream_entry_position(), which reads the resets' ids, computed here for the events (in the
    statement it was a fifth of the batch's Postgres time: numeric arithmetic per row)."""
    ms, _, seq = entry_id.partition(b"-")
    return min(int(ms), POSITION_MS_MAX) * 1_000_000 + min(int(seq), POSITION_SEQ_MAX)


def copy_text(rows: Iterable[Row]) -> bytes:
    """The rows in COPY text format, in stage column order (u, r, k, tr, tc, l, md, t, ps,
    stream position)."""
    lines = []
    for k, u, r, tr, tc, late, md, t, ps, entry_id in rows:
        if md and (b"\\" in md or b"\n" in md or b"\t" in md or b"\r" in md):
            md = (
                md.replace(b"\\", b"\\\\")
                .replace(b"\n", b"\\n")
                .replace(b"\t", b"\\t")
                .replace(b"\r", b"\\r")
            )
        position = b"%d" % stream_position(entry_id)
        lines.append(b"\t".join((u, r, k, tr, tc, late, md, t, ps, position)))
    lines.append(b"")
    return b"\n".join(lines)


def _valid_json(text: bytes) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def sanitize(batch: Batch) -> None:
    """Fallback after a DataError: metadata that is not a JSON object becomes {} rather than
    blocking the whole backlog behind one bad entry (the sidecar validates it, so this is a
    safety net)."""
    for row in batch.rows.values():
        if row[6] and not _valid_json(row[6]):
            log.error("invalid metadata replaced", extra={"user_id": row[1], "rid": row[2]})
            row[6] = b""
    batch.copy = copy_text(batch.rows.values())


class Flusher:
    """Writes batches over one psycopg connection (reconnected after a failure)."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=5, application_name="quota-sync-worker"
            )
            await self._conn.execute(CREATE_STAGE)
            await self._conn.commit()
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def ping(self) -> None:
        conn = await self.connection()
        await conn.execute("SELECT 1")
        await conn.rollback()

    async def reset_connection(self) -> None:
        """After an error the connection may be mid-transaction or dead: start afresh."""
        if self._conn is not None:
            try:
                await self._conn.rollback()
            except psycopg.Error:
                await self._conn.close()
                self._conn = None

    async def write(self, batch: Batch) -> int:
        """One transaction; returns how many alerts it recorded for the first time."""
        conn = await self.connection()
        async with conn.transaction(), conn.cursor() as cur:
            if batch.rows:
                async with cur.copy(COPY_STAGE) as copy:
                    await copy.write(batch.copy)
                await cur.execute(WRITE_EVENTS)
            # After the events of the batch, so the recomputation sees those after the reset.
            for key in sorted(batch.resets):
                reset = batch.resets[key]
                params = {
                    "user_id": reset.user_id,
                    "period_s": reset.period_s,
                    "entry_id": reset.entry_id,
                }
                await cur.execute(ENSURE_TOTAL, params)
                await cur.execute(LOCK_TOTAL, params)
                await cur.execute(RESET_TOTAL, params)
            recorded = 0
            if batch.alerts:
                columns = list(zip(*batch.alerts, strict=True))
                await cur.execute(
                    INSERT_ALERTS,
                    {
                        "users": list(columns[0]),
                        "thresholds": list(columns[1]),
                        "ps": list(columns[2]),
                        "pe": list(columns[3]),
                        "limits": list(columns[4]),
                        "used": list(columns[5]),
                        "t": list(columns[6]),
                    },
                )
                recorded = len(await cur.fetchall())
        return recorded
