"""Redis and Postgres of a benchmark run: Redis DB 3 only (FLUSHDB, never FLUSHALL), a Postgres
database of its own migrated with quota_common.migrate, users seeded straight through the Lua
scripts, and the naive baseline's table."""

from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.apps import NAIVE_TABLE
from quota_common import db
from quota_common.accounts import Account
from quota_common.keys import BUCKETS, SETTLE_GROUP, UserKeys, settle_stream, user_keys
from quota_common.migrate import create_database_if_missing, upgrade
from quota_common.periods import calendar_month
from quota_common.plans import FREE
from quota_common.scripts import SCRIPTS, register_all
from quota_common.settings import Settings

PIPELINE_CHUNK = 2000
HOLD_TTL_MS = 600_000
THRESHOLDS = ",".join(str(t) for t in Settings().alert_thresholds)

Call = tuple[str, list[str], list[Any]]  # script name, keys, args


async def run_calls(redis: Redis, calls: list[Call]) -> list[Any]:
    """The script calls as one non-transactional pipeline. Every call here may run twice (seed
    and replays of fixed reservation ids change nothing), so after a SCRIPT FLUSH by someone
    else sharing this Redis, the scripts are loaded again and the whole chunk repeated."""
    for attempt in range(3):
        pipe = redis.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.evalsha(SCRIPTS[name].sha, len(keys), *keys, *args)
        try:
            return list(await pipe.execute())
        except NoScriptError:
            if attempt == 2:
                raise
            await register_all(redis)
    raise AssertionError("unreachable")


def migrate(database_url: str) -> None:
    create_database_if_missing(database_url)
    engine = db.sync_engine(database_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"CREATE TABLE IF NOT EXISTS {NAIVE_TABLE} (user_id text PRIMARY KEY,"
                    " used bigint NOT NULL, quota bigint NOT NULL)"
                )
            )
    finally:
        engine.dispose()


def drop_database(database_url: str) -> None:
    root, name = database_url.rsplit("/", 1)
    admin = db.sync_engine(f"{root}/postgres")
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


async def reset_naive(engine: AsyncEngine, groups: list[tuple[str, int, int]]) -> None:
    """The naive service's table holds exactly these users: (prefix, count, quota) each."""
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {NAIVE_TABLE}"))
        for prefix, count, quota in groups:
            await conn.execute(
                text(
                    "INSERT INTO bench_naive_usage (user_id, used, quota)"
                    " SELECT :prefix || g, 0, :quota FROM generate_series(0, :last) AS g"
                ),
                {"prefix": prefix, "quota": quota, "last": count - 1},
            )
    async with engine.connect() as conn:
        await conn.execute(text(f"ANALYZE {NAIVE_TABLE}"))


async def naive_books(engine: AsyncEngine, prefix: str) -> dict[str, int]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT count(*) AS users, coalesce(sum(used), 0) AS used,"
                    " coalesce(sum(quota), 0) AS quota,"
                    " coalesce(sum(greatest(used - quota, 0)), 0) AS beyond,"
                    " count(*) FILTER (WHERE used > quota) AS users_over"
                    " FROM bench_naive_usage WHERE user_id LIKE :pattern"
                ),
                {"pattern": prefix + "%"},
            )
        ).one()
    return {k: int(v) for k, v in row._mapping.items()}


async def truncate_usage(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE usage_events, usage_totals RESTART IDENTITY"))


async def count_usage_events(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM usage_events")) or 0)


async def flush(redis: Redis) -> None:
    """Empties DB 3 (this connection's database only) and loads the scripts."""
    await redis.flushdb()
    await register_all(redis)


def seed_args(quota: int) -> list[Any]:
    """ARGV of lua/seed.lua for a FREE user with this quota and no usage yet."""
    start, end = calendar_month(datetime.now(UTC))
    account = Account("", FREE, quota, 0, 0, start, end, None, None)
    return list(account.script_args())


def seed_call(user: UserKeys, args: list[Any]) -> Call:
    return ("seed", [user.state, user.holds], [*args, user.record_prefix])


async def seed_users(redis: Redis, prefix: str, count: int, quota: int) -> None:
    """Puts users <prefix>0..<prefix><count-1> in Redis as the sidecar's cold load would."""
    args = seed_args(quota)
    for first in range(0, count, PIPELINE_CHUNK):
        last = min(first + PIPELINE_CHUNK, count)
        calls = [seed_call(user_keys(f"{prefix}{n}"), args) for n in range(first, last)]
        await run_calls(redis, calls)


# KEYS and ARGV as the headers of lua/reserve.lua and lua/commit.lua describe them (and
# sidecar/ledger.py passes them); follow those headers when they change.


def reserve_call(user_id: str, reservation_id: str, tokens: int) -> tuple[list[str], list[Any]]:
    user = user_keys(user_id)
    keys = user.reservation_keys(reservation_id)
    return keys, [user_id, reservation_id, tokens, 0, HOLD_TTL_MS, "", user.record_prefix]


def commit_call(user_id: str, reservation_id: str, tokens: int) -> tuple[list[str], list[Any]]:
    user = user_keys(user_id)
    keys = user.reservation_keys(reservation_id)
    return keys, [user_id, reservation_id, tokens, "", user.record_prefix, THRESHOLDS]


async def reserve_each(redis: Redis, prefix: str, count: int, tokens: int) -> int:
    """One open hold per user; returns how many reserves were granted."""
    granted = 0
    for first in range(0, count, PIPELINE_CHUNK):
        last = min(first + PIPELINE_CHUNK, count)
        calls: list[Call] = [
            ("reserve", *reserve_call(f"{prefix}{n}", f"m{n}", tokens)) for n in range(first, last)
        ]
        granted += sum(1 for reply in await run_calls(redis, calls) if reply[0] in (0, 1))
    return granted


async def settle_events(redis: Redis, prefix: str, users: int, events: int, tokens: int) -> int:
    """`events` reservations reserved and committed through the scripts, so each leaves one
    settlement in its bucket's stream for the sync worker; returns how many committed."""
    committed, chunk = 0, PIPELINE_CHUNK // 2
    for first in range(0, events, chunk):
        calls: list[Call] = []
        for n in range(first, min(first + chunk, events)):
            user_id, rid = f"{prefix}{n % users}", f"e{n}"
            calls.append(("reserve", *reserve_call(user_id, rid, tokens)))
            calls.append(("commit", *commit_call(user_id, rid, tokens)))
        results = await run_calls(redis, calls)
        committed += sum(1 for reply in results[1::2] if reply[0] in (0, 1))
    return committed


async def create_settle_groups(redis: Redis) -> None:
    """The settlers group on every bucket's stream from its first entry, so a worker that
    creates the group at "$" (new entries only) still sees what is already there."""
    for bucket in range(BUCKETS):
        try:
            await redis.xgroup_create(settle_stream(bucket), SETTLE_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise


async def db_memory(redis: Redis) -> tuple[int, int]:
    """Keys of this database and the sum of their MEMORY USAGE, in bytes: unlike used_memory,
    blind to whatever other databases of the same Redis do meanwhile."""
    keys = total = 0
    cursor = 0
    while True:
        cursor, batch = await redis.scan(cursor, count=5000)
        if batch:
            pipe = redis.pipeline(transaction=False)
            for key in batch:
                pipe.memory_usage(key, samples=0)
            total += sum(int(x or 0) for x in await pipe.execute())
            keys += len(batch)
        if cursor == 0:
            return keys, total


async def used_memory(redis: Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def redis_pid(redis: Redis) -> int:
    info = await redis.info("server")
    return int(info["process_id"])
