"""`quota-migrate`: creates the database if it is missing and brings its schema to the latest
migration. Safe to run any number of times."""

import sys

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from quota_common import settings as settings_module
from quota_common.db import sqlalchemy_url, sync_engine


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "quota_common:migrations")
    return config


def create_database_if_missing(database_url: str) -> None:
    url = make_url(sqlalchemy_url(database_url))
    name = url.database
    if not name:
        return
    admin = sync_engine(url.set(database="postgres").render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def upgrade(engine: Engine) -> None:
    config = alembic_config()
    with engine.begin() as conn:
        # One migrator at a time, even when several containers start together.
        conn.execute(text("SELECT pg_advisory_xact_lock(7300131)"))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def main() -> None:
    try:
        settings = settings_module.load()
    except settings_module.SettingsError as error:
        settings_module.exit_bad_setting("quota-migrate", error)
    try:
        create_database_if_missing(settings.database_url)
        engine = sync_engine(settings.database_url)
        upgrade(engine)
        engine.dispose()
    except Exception as error:
        sys.exit(f"quota-migrate: {type(error).__name__}: {str(error).splitlines()[0]}")
    print("quota-migrate: schema is at the latest migration")
