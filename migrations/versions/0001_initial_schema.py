"""Counters and calls tables, and the PostgreSQL allocation function.

A database that has a ``calls`` table already (an audit database numbered by
legacy in-process counters) is adopted instead: its table, rows, columns and
indices are kept, and only the columns callindex writes that it lacks are
added, all nullable, so nothing is rewritten and no legacy insert breaks
(0002's guards do refuse legacy UPDATEs and DELETEs of finished calls: the
trail is append-only from then on).
Counters start empty: the numbering trigger (0004) and ``open_state`` start
a state's counter past its recorded calls, and ``callindex db adopt``
backfills them all in batches (see callindex.adoption).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = ("callindex",)
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# Same statement as the library's allocate_call_index, for writers in other
# languages. Parameters are qualified with the function name because state_id
# is also a column name.
ALLOCATE_FUNCTION = """
CREATE FUNCTION callindex_allocate(state_id text, count integer DEFAULT 1)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate.count IS NULL OR callindex_allocate.count < 1 THEN
        RAISE EXCEPTION 'callindex_allocate: count must be at least 1, not %',
            callindex_allocate.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE call_index_counters AS counters
    SET next_index = counters.next_index + callindex_allocate.count
    WHERE counters.state_id = callindex_allocate.state_id
    RETURNING counters.next_index - callindex_allocate.count INTO first_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate: unknown state %', callindex_allocate.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$$
"""


def _now() -> sa.TextClause:
    # SQLite's CURRENT_TIMESTAMP has whole seconds only; keep milliseconds.
    if op.get_context().dialect.name == "sqlite":
        return sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now'))")
    return sa.text("now()")


# The columns callindex writes besides call_id, state_id and call_index, as an
# adopted table gets them when it lacks them: nullable, without a default.
ADOPTED_COLUMNS = (
    ("call_type", sa.String(length=64)),
    ("status", sa.String(length=16)),
    ("request", _json),
    ("request_hash", sa.String(length=64)),
    ("response", _json),
    ("response_hash", sa.String(length=64)),
    ("error", _json),
    ("error_hash", sa.String(length=64)),
    ("latency_ms", sa.Float()),
    ("created_at", sa.DateTime(timezone=True)),
    ("completed_at", sa.DateTime(timezone=True)),
)


def adopting() -> bool:
    """Whether this database has a calls table that callindex did not create."""
    context = op.get_context()
    if context.as_sql:
        return False
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("calls"):
        return False
    return not any(
        key["referred_table"] == "call_index_counters"
        for key in inspector.get_foreign_keys("calls")
    )


def _adopt_calls() -> None:
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("calls")}
    for name, type_ in ADOPTED_COLUMNS:
        if name not in present:
            op.add_column("calls", sa.Column(name, type_, nullable=True))


def upgrade() -> None:
    # The library checks an existing calls table before it runs the
    # migrations (callindex.migrations: upgrade, upgrade_with).
    adopted = adopting()
    op.create_table(
        "call_index_counters",
        sa.Column("state_id", sa.Text(), nullable=False),
        sa.Column("next_index", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.CheckConstraint(
            "next_index >= 0", name=op.f("ck_call_index_counters_next_index_non_negative")
        ),
        sa.CheckConstraint(
            "length(state_id) BETWEEN 1 AND 255",
            name=op.f("ck_call_index_counters_state_id_length"),
        ),
        sa.PrimaryKeyConstraint("state_id", name=op.f("pk_call_index_counters")),
        postgresql_with={"fillfactor": 20},
    )
    if adopted:
        _adopt_calls()
    else:
        _create_calls()
    if op.get_context().dialect.name == "postgresql":
        op.execute(ALLOCATE_FUNCTION)


def _create_calls() -> None:
    op.create_table(
        "calls",
        sa.Column("call_id", sa.Text(), nullable=False),
        sa.Column("state_id", sa.Text(), nullable=False),
        sa.Column("call_index", sa.BigInteger(), nullable=False),
        sa.Column("call_type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request", _json, nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("response", _json, nullable=True),
        sa.Column("response_hash", sa.String(length=64), nullable=True),
        sa.Column("error", _json, nullable=True),
        sa.Column("error_hash", sa.String(length=64), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("call_index >= 0", name=op.f("ck_calls_call_index_non_negative")),
        sa.CheckConstraint(
            "status IN ('pending', 'success', 'error', 'abandoned')",
            name=op.f("ck_calls_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["state_id"],
            ["call_index_counters.state_id"],
            name=op.f("fk_calls_state_id_call_index_counters"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_calls")),
        sa.UniqueConstraint("state_id", "call_index", name=op.f("uq_calls_state_id_call_index")),
    )


def downgrade() -> None:
    """An adopted calls table stays, with the columns callindex added to it."""
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION callindex_allocate(text, integer)")
    if not adopting():
        op.drop_table("calls")
    op.drop_table("call_index_counters")
