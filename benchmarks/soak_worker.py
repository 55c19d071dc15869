"""Soak of the sync worker: kill -9 it 20 times during 50,000 commits, with operator resets
in between, then count what reached Postgres. Lost = commits answered 200 that are not in
usage_events; doubled = events or totals counted more than once. Both must be 0, every total
must be the sum of its events since the period's last reset, and Redis `used` must equal it.

    .venv/bin/python -m benchmarks.soak_worker --commits 50000 --kills 20 --redis-db 12

Starts its own sidecar and worker on loopback, uses its own Postgres database (--database,
dropped afterwards) and the given Redis database (FLUSHDB only). Each commit is a commit
without a reservation (answered 200, `late`), or with --reserve a reserve followed by its
commit.
"""

import argparse
import asyncio
import os
import secrets
import signal
import tempfile
import time
from pathlib import Path

import httpx
import redis as redis_sync
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.procs import BIN, Server, free_port
from quota_common import db
from quota_common.migrate import create_database_if_missing, upgrade

PG_ROOT = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
# The operator token of this run's sidecar (it only listens on loopback).
ADMIN_TOKEN = secrets.token_hex(16)
DRAIN_TIMEOUT_S = 120

# Totals that are not the sum of their period's committed events after the last reset.
WRONG_TOTALS = """
SELECT count(*) FROM (
    SELECT t.tokens_charged, coalesce(sum(e.tokens_charged), 0) AS events
    FROM usage_totals t
    LEFT JOIN usage_events e ON e.user_id = t.user_id AND e.period_start = t.period_start
        AND e.status = 'committed' AND e.stream_position > coalesce(t.reset_position, -1)
    GROUP BY t.user_id, t.period_start, t.tokens_charged
) AS checked
WHERE tokens_charged <> events
"""


def kill_9(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=50_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--resets", type=int, default=20, help="operator resets during the run")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reserve", action="store_true")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--database", default="quota_soak_worker")
    return parser.parse_args()


async def redis_used_differs(http: httpx.AsyncClient, engine: AsyncEngine) -> int:
    """Users whose Redis `used` is not the Postgres total of their period."""
    async with engine.connect() as conn:
        totals = (
            await conn.execute(text("SELECT user_id, tokens_charged FROM usage_totals"))
        ).all()
    differ = 0
    for user_id, tokens in totals:
        if (await http.get(f"/v1/usage/{user_id}")).json()["used"] != tokens:
            differ += 1
    return differ


async def main() -> None:
    args = arguments()
    database_url = f"{PG_ROOT}/{args.database}"
    create_database_if_missing(database_url)
    engine = db.sync_engine(database_url)
    upgrade(engine)
    with engine.begin() as setup:
        setup.execute(text("TRUNCATE usage_events, usage_totals, usage_alerts, admin_audit"))
    engine.dispose()
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_TIMEOUT_MS": "2000",
        "LOG_LEVEL": "WARNING",
        "QUOTA_FREE": str(10**12),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "SYNC_CLAIM_IDLE_MS": "1000",
        "SYNC_BATCH_SIZE": "500",
        "SYNC_DRIFT_INTERVAL_S": "2",
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
    redis_sync.Redis.from_url(redis_url).flushdb()
    sidecar.start("/healthz")
    worker.start("/healthz")

    committed: dict[tuple[str, str], int] = {}
    reset_users: set[str] = set()
    errors = 0
    kills = 0
    every_kill = args.commits // (args.kills + 1)
    every_reset = args.commits // (args.resets + 1)
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
            if len(committed) >= every_kill * (kills + 1):
                kill_9(worker)
                kills += 1
                await asyncio.to_thread(worker.start, "/healthz")
            await asyncio.sleep(0.01)

    async def resetter(http: httpx.AsyncClient) -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        while len(reset_users) < args.resets:
            if len(committed) >= every_reset * (len(reset_users) + 1):
                user = f"soak{len(reset_users) * 7 % args.users}"
                answer = await http.post(
                    f"/admin/v1/users/{user}/reset", json={"reason": "soak"}, headers=headers
                )
                if answer.status_code != 200:
                    errors += 1
                reset_users.add(user)
            await asyncio.sleep(0.01)

    started = time.monotonic()
    limits = httpx.Limits(max_connections=args.concurrency + 1)
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30, limits=limits) as http:
        side_tasks = [asyncio.create_task(killer()), asyncio.create_task(resetter(http))]
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        await asyncio.gather(*side_tasks)
    load_s = time.monotonic() - started
    print(
        f"{len(committed)} commits answered 200 in {load_s:.1f}s, {errors} errors, "
        f"{kills} kill -9 of the worker, {len(reset_users)} users reset"
    )

    async_engine = db.async_engine(database_url)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        async with async_engine.connect() as conn:
            count = await conn.scalar(
                text("SELECT count(*) FROM usage_events WHERE status = 'committed'")
            )
        if count >= len(committed) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    synced_s = time.monotonic() - started
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
        wrong_totals = int(await conn.scalar(text(WRONG_TOTALS)) or 0)
    lost = sum(1 for key in committed if key not in events)
    wrong = sum(1 for key, t in committed.items() if key in events and events[key] != t)
    extra = sum(1 for key in events if key not in committed)
    # Users never reset: their total is every tokens they were charged.
    by_user: dict[str, int] = {}
    for (user, _), tokens in committed.items():
        if user not in reset_users:
            by_user[user] = by_user.get(user, 0) + tokens
    doubled_tokens = sum(max(0, totals.get(u, 0) - t) for u, t in by_user.items())
    missing_tokens = sum(max(0, t - totals.get(u, 0)) for u, t in by_user.items())
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30) as http:
        redis_differs = await redis_used_differs(http, async_engine)
    await async_engine.dispose()
    print(
        f"events: {rows} rows for {len(committed)} commits; lost {lost}, wrong charge {wrong},"
        f" unexpected {extra}; totals: doubled {doubled_tokens} tokens,"
        f" missing {missing_tokens} tokens, {wrong_totals} not the sum of their events after"
        f" the last reset; redis used differs from postgres for {redis_differs} users;"
        f" all in postgres {synced_s:.1f}s after the start"
    )
    worker.stop()
    sidecar.stop()
    redis_sync.Redis.from_url(redis_url).flushdb()
    admin = db.sync_engine(f"{PG_ROOT}/postgres")
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as cleanup:
        cleanup.execute(text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
    admin.dispose()
    checks = (lost, wrong, extra, doubled_tokens, missing_tokens, wrong_totals, redis_differs)
    ok = not any(checks) and kills == args.kills and errors == 0
    print("PASS" if ok else "FAIL", f"(logs in {logs})")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
