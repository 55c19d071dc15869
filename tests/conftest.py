"""Fixtures on real servers: a Postgres database migrated for this test run, a Redis database
of its own (TEST_REDIS_DB, so parallel runs do not meet), and the sidecar as a real process.
Every test starts from empty Redis and empty tables."""

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from quota_common import db
from quota_common.migrate import create_database_if_missing, upgrade
from quota_common.schema import metadata
from tests.servers import Process, free_port

PG_ROOT = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "9"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"quota_test_{os.getpid()}"
    url = f"{PG_ROOT}/{name}"
    create_database_if_missing(url)
    engine = db.sync_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    admin = db.sync_engine(f"{PG_ROOT}/postgres")
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def base_env(database_url: str) -> dict[str, str]:
    """Settings of every process the tests start."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        # Generous, so a busy test machine is not taken for a dead Redis.
        "REDIS_TIMEOUT_MS": "2000",
        "ADMIN_TOKEN": "test-admin-token",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def pg(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.async_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(autouse=True)
async def clean_state(pg: AsyncEngine) -> None:
    client = Redis.from_url(REDIS_URL)
    await client.flushdb()
    await client.aclose()
    async with pg.begin() as conn:
        names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
        await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))


def start_sidecar(base_env: dict[str, str], logs_dir: Path, **env: str) -> tuple[Process, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = Process(
        "quota-sidecar",
        {**base_env, "SIDECAR_PORT": str(port), **env},
        logs_dir / f"sidecar-{port}.log",
        ready_url=f"{url}/healthz",
    ).start()
    return process, url


@pytest.fixture(scope="session")
def sidecar_url(base_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    process, url = start_sidecar(base_env, logs_dir)
    yield url
    process.stop()


@pytest.fixture
async def http(sidecar_url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
    async with httpx.AsyncClient(base_url=sidecar_url, limits=limits, timeout=30) as client:
        yield client
