"""Soak of the sync worker: kill -9 it 20 times during 50,000 commits, then count what
reached Postgres. Lost = commits answered 200 that are not in usage_events; doubled = events
or totals counted more than once. Both must be 0.

    .venv/bin/python -m benchmarks.soak_worker --commits 50000 --kills 20 --redis-db 12

Starts its own sidecar and worker on loopback, uses its own Postgres database
(quota_soak_worker, dropped afterwards) and the given Redis database (FLUSHDB only). Each
commit is a commit without a reservation (answered 200, `late`), or with --reserve a
reserve followed by its commit.
"""

import argparse
import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import text

from benchmarks.procs import BIN, Server, free_port
from quota_common import db
from quota_common.migrate import create_database_if_missing, upgrade

PG_ROOT = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
DATABASE = "quota_soak_worker"


def kill_9(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=50_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reserve", action="store_true")
    parser.add_argument("--redis-db", type=int, default=12)
    args = parser.parse_args()

    database_url = f"{PG_ROOT}/{DATABASE}"
    create_database_if_missing(database_url)
    engine = db.sync_engine(database_url)
    upgrade(engine)
    with engine.begin() as setup:
        setup.execute(text("TRUNCATE usage_events, usage_totals, usage_alerts"))
    engine.dispose()
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_TIMEOUT_MS": "2000",
        "LOG_LEVEL": "WARNING",
        "QUOTA_FREE": str(10**12),
        "SYNC_CLAIM_IDLE_MS": "1000",
        "SYNC_BATCH_SIZE": "500",
    }
    logs = Path(tempfile.mkdtemp(prefix="soak-worker-"))
    sidecar_port = free_port()
    sidecar = Server(
        "sidecar",
        [str(BIN / "quota-sidecar")],
        {**env, "SIDECAR_PORT": str(sidecar_port)},
        sidecar_port,
        logs,
    )
    worker_port = free_port()
    worker = Server(
        "worker",
        [str(BIN / "quota-sync-worker")],
        {**env, "SYNC_WORKER_PORT": str(worker_port)},
        worker_port,
        logs,
    )
    import redis as redis_sync

    redis_sync.Redis.from_url(redis_url).flushdb()
    sidecar.start("/healthz")
    worker.start("/healthz")

    committed: dict[tuple[str, str], int] = {}
    errors = 0
    kills = 0
    every = args.commits // (args.kills + 1)
    queue = iter(range(args.commits))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for n in queue:
            user, rid, tokens = f"soak{n % args.users}", f"s{n}", 1 + n % 113
            try:
                if args.reserve:
                    r = await http.post(
                        "/v1/reserve", json={"user_id": user, "tokens": 200, "reservation_id": rid}
                    )
                    if r.status_code != 200:
                        errors += 1
                        continue
                c = await http.post(
                    "/v1/commit", json={"user_id": user, "reservation_id": rid, "tokens": tokens}
                )
            except httpx.HTTPError:
                errors += 1
                continue
            if c.status_code == 200:
                committed[(user, rid)] = c.json()["charged"]
            else:
                errors += 1

    async def killer() -> None:
        nonlocal kills
        while kills < args.kills:
            if len(committed) >= every * (kills + 1):
                kill_9(worker)
                kills += 1
                await asyncio.to_thread(worker.start, "/healthz")
            await asyncio.sleep(0.01)

    started = time.monotonic()
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30, limits=limits) as http:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        await kill_task
    load_s = time.monotonic() - started
    print(
        f"{len(committed)} commits answered 200 in {load_s:.1f}s, {errors} errors, "
        f"{kills} kill -9 of the worker"
    )

    async_engine = db.async_engine(database_url)
    deadline = time.monotonic() + 120
    while True:
        async with async_engine.connect() as conn:
            count = await conn.scalar(
                text("SELECT count(*) FROM usage_events WHERE status = 'committed'")
            )
        if count >= len(committed) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    async with async_engine.connect() as conn:
        events = {
            (u, r): int(t)
            for u, r, t in (
                await conn.execute(
                    text("SELECT user_id, reservation_id, tokens_charged FROM usage_events")
                )
            ).all()
        }
        rows = await conn.scalar(text("SELECT count(*) FROM usage_events"))
        totals = {
            u: int(t)
            for u, t in (
                await conn.execute(
                    text("SELECT user_id, sum(tokens_charged) FROM usage_totals GROUP BY user_id")
                )
            ).all()
        }
    await async_engine.dispose()
    lost = sum(1 for key in committed if key not in events)
    wrong = sum(1 for key, t in committed.items() if key in events and events[key] != t)
    extra = sum(1 for key in events if key not in committed)
    by_user: dict[str, int] = {}
    for (user, _), tokens in committed.items():
        by_user[user] = by_user.get(user, 0) + tokens
    doubled_tokens = sum(max(0, totals.get(u, 0) - t) for u, t in by_user.items())
    missing_tokens = sum(max(0, t - totals.get(u, 0)) for u, t in by_user.items())
    print(
        f"events: {rows} rows for {len(committed)} commits; lost {lost}, wrong charge {wrong},"
        f" unexpected {extra}; totals: doubled {doubled_tokens} tokens,"
        f" missing {missing_tokens} tokens"
    )
    worker.stop()
    sidecar.stop()
    redis_sync.Redis.from_url(redis_url).flushdb()
    admin = db.sync_engine(f"{PG_ROOT}/postgres")
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as cleanup:
        cleanup.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
    admin.dispose()
    ok = lost == wrong == extra == doubled_tokens == missing_tokens == 0 and kills == args.kills
    print("PASS" if ok else "FAIL", f"(logs in {logs})")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
