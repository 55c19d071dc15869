"""sync: stream positions of settlements and resets; NOTIFY on every subscriptions change

Revision ID: 0003_sync
Revises: 0002

- `usage_events.stream_position`: where the settlement stood in its bucket's settle stream.
  0 for rows written before this migration (they precede every reset recorded after it).
- `usage_totals.reset_position`: the position of the period's last operator reset; only events
  after it count in the total, whichever worker writes them and whenever. A partial index on
  the rows that have one keeps the worker's look-up as cheap as resets are rare.
- `stream_entry_position(text)`: a Redis stream entry id "<ms>-<seq>" as that number,
  ms * 10^6 + seq (seq capped at 999999, ms at what fits a bigint), so SQL orders a user's
  settlements exactly and no id can make a batch fail.
- A trigger on `subscriptions` sends the user id on the `quota_plans` channel for every row
  inserted, changed or deleted, by the billing API or by anyone else.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_sync"
down_revision = "0002"
branch_labels = None
depends_on = None

STREAM_ENTRY_POSITION = """
CREATE FUNCTION stream_entry_position(entry_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (least(split_part(entry_id, '-', 1)::numeric, 9223372036853) * 1000000
        + least(split_part(entry_id, '-', 2)::numeric, 999999))::bigint
$$
"""

# Delivered at commit, like the billing API's own pg_notify (the same payload twice in one
# transaction is delivered once).
NOTIFY_PLAN_CHANGE = """
CREATE FUNCTION notify_plan_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('quota_plans', OLD.user_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('quota_plans', NEW.user_id);
    END IF;
    RETURN NULL;
END
$$
"""
PLAN_TRIGGER = """
CREATE TRIGGER subscriptions_notify_plan
AFTER INSERT OR UPDATE OR DELETE ON subscriptions
FOR EACH ROW EXECUTE FUNCTION notify_plan_change()
"""


def upgrade() -> None:
    op.add_column(
        "usage_events",
        sa.Column("stream_position", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column("usage_totals", sa.Column("reset_position", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_usage_totals_reset",
        "usage_totals",
        ["user_id", "period_start"],
        unique=False,
        postgresql_where=sa.text("reset_position IS NOT NULL"),
    )
    op.execute(STREAM_ENTRY_POSITION)
    op.execute(NOTIFY_PLAN_CHANGE)
    op.execute(PLAN_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER subscriptions_notify_plan ON subscriptions")
    op.execute("DROP FUNCTION notify_plan_change()")
    op.execute("DROP FUNCTION stream_entry_position(text)")
    op.drop_index("ix_usage_totals_reset", table_name="usage_totals")
    op.drop_column("usage_totals", "reset_position")
    op.drop_column("usage_events", "stream_position")
