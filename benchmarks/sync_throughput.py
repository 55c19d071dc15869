"""Sync worker throughput: settled entries from Redis into Postgres with one worker.

Fills the settle streams with N commit entries (as lua/commit.lua writes them, spread over
USERS users and so over every bucket), then times the worker's settle step until the streams
are empty, and checks the books (N events, totals = sum of charges).

    .venv/bin/python -m benchmarks.sync_throughput --entries 200000 --redis-db 12 --writers 2

Uses its own Postgres database (--database, default quota_bench_sync, dropped afterwards) and
the given Redis database, which it FLUSHDBs (never FLUSHALL).
"""

import argparse
import asyncio
import os
import time

from redis.asyncio import Redis
from sqlalchemy import text

from quota_common import db, keys
from quota_common import settings as settings_module
from quota_common.migrate import create_database_if_missing, upgrade
from sync_worker.settle import Settler
from sync_worker.worker import Worker

PG_ROOT = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")


async def fill(redis: Redis, entries: int, users: int) -> None:
    now_ms = int(time.time() * 1000)
    period_s = 1_700_000_000
    pipe = redis.pipeline(transaction=False)
    for n in range(entries):
        user = f"user-{n % users}"
        pipe.xadd(
            keys.user_keys(user).stream,
            {
                "k": "committed",
                "u": user,
                "r": f"res-{n}",
                "tr": 1000,
                "tc": 1 + n % 997,
                "l": 0,
                "md": f'{{"conversation_id":"c-{n % 50}"}}',
                "t": now_ms,
                "ps": period_s,
            },
        )
        if len(pipe) >= 10_000:
            await pipe.execute()
    await pipe.execute()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=2, help="SYNC_WRITERS")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--database", default="quota_bench_sync")
    args = parser.parse_args()

    database_url = f"{PG_ROOT}/{args.database}"
    create_database_if_missing(database_url)
    engine = db.sync_engine(database_url)
    upgrade(engine)
    with engine.begin() as setup:
        setup.execute(text("TRUNCATE usage_events, usage_totals, usage_alerts"))
    engine.dispose()
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    redis = Redis.from_url(redis_url)
    await redis.flushdb()

    settings = settings_module.load(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SYNC_BATCH_SIZE": str(args.batch),
            "SYNC_WRITERS": str(args.writers),
        }
    )
    worker = Worker(settings)
    await worker.start()
    await fill(redis, args.entries, args.users)
    print(f"filled {args.entries} entries for {args.users} users")

    async def drain(settler: Settler) -> int:
        # Each writer at its own pace, as the worker's settle loops run.
        written = 0
        while n := await settler.run_once():
            written += n
        return written

    started = time.perf_counter()
    written = sum(await asyncio.gather(*(drain(settler) for settler in worker.settlers)))
    elapsed = time.perf_counter() - started
    print(
        f"wrote {written} entries in {elapsed:.2f}s: {written / elapsed:,.0f} events/s "
        f"(batch {args.batch}, {args.writers} writers)"
    )

    async with worker.engine.connect() as conn:
        events = await conn.scalar(text("SELECT count(*) FROM usage_events"))
        total = await conn.scalar(text("SELECT sum(tokens_charged) FROM usage_totals"))
    expected = sum(1 + n % 997 for n in range(args.entries))
    print(f"books: events={events} (want {args.entries}), totals={total} (want {expected})")
    await worker.close()
    await redis.flushdb()
    await redis.aclose()
    admin = db.sync_engine(f"{PG_ROOT}/postgres")
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as cleanup:
        cleanup.execute(text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
    admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
