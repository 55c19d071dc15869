"""The Postgres schema (the durable record). Alembic migrations in `migrations/` build exactly
this; tests/test_migrations.py proves that they agree.

`usage_events` and `usage_alerts` are read by reporting tools: their columns are contract.
Migration 0003 also creates what a Table cannot say: the SQL function stream_entry_position()
and the trigger that NOTIFYs `quota_plans` on every change of `subscriptions`.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

ID = String(128)

customers = Table(
    "customers",
    metadata,
    Column("user_id", ID, primary_key=True),
    Column("stripe_customer_id", String(255), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("stripe_subscription_id", String(255), unique=True),
    Column("plan", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("current_period_start", DateTime(timezone=True), nullable=False),
    Column("current_period_end", DateTime(timezone=True), nullable=False),
    Column("cancel_at_period_end", Boolean, nullable=False, server_default="false"),
    # Stripe's `created` of the newest event applied, so an older event never overwrites it.
    Column("stripe_updated_at", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_subscriptions_user_id", "user_id"),
)

payments = Table(
    "payments",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("stripe_invoice_id", String(255), unique=True),
    Column("stripe_subscription_id", String(255)),
    Column("amount_cents", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("plan", String(16)),
    Column("hosted_invoice_url", Text),
    Column("invoice_pdf", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Cents refunded so far: a partial refund keeps the status `succeeded`.
    Column("amount_refunded_cents", BigInteger, nullable=False, server_default="0"),
    Index("ix_payments_user_id_created_at", "user_id", "created_at"),
)

usage_events = Table(
    "usage_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("reservation_id", ID, nullable=False),
    Column("status", String(16), nullable=False),
    Column("tokens_reserved", BigInteger, nullable=False),
    Column("tokens_charged", BigInteger, nullable=False),
    Column("late", Boolean, nullable=False),
    Column("metadata", JSONB, nullable=False, server_default="{}"),
    Column("period_start", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Where the settlement stood in its bucket's settle stream (SQL stream_entry_position() of
    # the entry id): orders a user's settlements exactly, against resets. 0 = before any reset.
    Column("stream_position", BigInteger, nullable=False, server_default="0"),
    UniqueConstraint("user_id", "reservation_id", name="uq_usage_events_user_reservation"),
    Index("ix_usage_events_user_id_settled_at", "user_id", "settled_at"),
)

usage_totals = Table(
    "usage_totals",
    metadata,
    Column("user_id", ID, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("tokens_charged", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Stream position of the period's last operator reset: the total counts only the events
    # after it (null: never reset). The sync worker looks up only the rows that have one.
    Column("reset_position", BigInteger),
    Index(
        "ix_usage_totals_reset",
        "user_id",
        "period_start",
        postgresql_where=text("reset_position IS NOT NULL"),
    ),
)

credit_grants = Table(
    "credit_grants",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("period_start", DateTime(timezone=True), nullable=False),
    Column("reason", String(500), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_credit_grants_user_id_period_start", "user_id", "period_start"),
)

admin_audit = Table(
    "admin_audit",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("action", String(32), nullable=False),
    Column("user_id", ID, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("details", JSONB, nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

usage_alerts = Table(
    "usage_alerts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("threshold", Integer, nullable=False),
    Column("period_start", DateTime(timezone=True), nullable=False),
    Column("period_end", DateTime(timezone=True), nullable=False),
    Column("limit", BigInteger, nullable=False),
    Column("used", BigInteger, nullable=False),
    Column("triggered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    UniqueConstraint("user_id", "period_start", "threshold", name="uq_usage_alerts_once"),
)

# One row per subscribe, written before Stripe is asked, whose id makes the Stripe idempotency
# key; open (finished_at null) until the subscription it made is recorded or it is known that
# Stripe never made one. At most one open attempt per user.
subscribe_attempts = Table(
    "subscribe_attempts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("plan", String(16), nullable=False),
    Column("stripe_customer_id", String(255), nullable=False),
    Column("stripe_subscription_id", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True)),
    Index(
        "uq_subscribe_attempts_open",
        "user_id",
        unique=True,
        postgresql_where=text("finished_at IS NULL"),
    ),
)

# The billing API's per-user lease: whoever holds an unexpired row may change that user's
# billing; taken and checked in short transactions, never held open across Stripe calls.
billing_leases = Table(
    "billing_leases",
    metadata,
    Column("user_id", ID, primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

stripe_events = Table(
    "stripe_events",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("type", String(128), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
