"""Postgres engines. DATABASE_URL is a plain postgresql:// URL; the psycopg 3 driver is chosen
here so that operators never write SQLAlchemy dialect names."""

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def sqlalchemy_url(database_url: str) -> str:
    scheme, rest = database_url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    return f"{scheme}://{rest}"


def async_engine(database_url: str, pool_size: int = 5) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5},
    )


def sync_engine(database_url: str) -> Engine:
    return create_engine(sqlalchemy_url(database_url), connect_args={"connect_timeout": 5})
