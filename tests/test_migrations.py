"""The Alembic migrations build exactly quota_common/schema.py: autogenerate finds nothing to
change on the test run's database, which conftest created empty and migrated with them."""

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, Table, text

from quota_common import db
from quota_common.migrate import upgrade
from quota_common.schema import metadata


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.sync_engine(database_url)
    yield engine
    engine.dispose()


def test_migrations_equal_the_schema(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_upgrade_again_changes_nothing(engine: Engine) -> None:
    upgrade(engine)
    upgrade(engine)
    with engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
    assert len(versions) == 1


def test_the_comparison_would_see_a_difference(engine: Engine) -> None:
    """Guards the test above against comparing nothing."""
    changed = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    Table("usage_events", changed, Column("extra", Integer), extend_existing=True)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, changed)
    assert [d[0] for d in differences] == ["add_column"]
