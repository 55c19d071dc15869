"""Alembic environment: runs migrations on the connection quota_common.migrate hands over."""

from alembic import context

from quota_common.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
