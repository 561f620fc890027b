"""The tables callindex owns, as SQLAlchemy Core metadata.

The naming convention gives every constraint and index a stable name, so
migrations, the plain SQL in ``sql/`` and the running database agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from callindex.payloads import LEGACY_SCHEME, SCHEME

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MAX_STATE_ID_LENGTH: Final = 255
CALL_STATUSES: Final = ("pending", "success", "error", "abandoned")

# Counter rows are updated in place many times; free space on each page lets
# PostgreSQL keep every bump a HOT update (no index maintenance, less bloat).
COUNTER_FILLFACTOR: Final = 20


class utc_now(FunctionElement[datetime]):
    """The current time as a column default: ``now()`` on PostgreSQL; UTC text
    with milliseconds on SQLite, whose ``CURRENT_TIMESTAMP`` has only seconds."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now'))"


metadata = MetaData(naming_convention=NAMING_CONVENTION)

# PostgreSQL's json (not jsonb): it keeps a payload's text as written, so what
# is stored hashes to what is recorded (jsonb rewrites numbers).
_json = JSON().with_variant(postgresql.JSON(), "postgresql")

call_index_counters = Table(
    "call_index_counters",
    metadata,
    Column("state_id", Text, primary_key=True),
    Column("next_index", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    CheckConstraint("next_index >= 0", name="next_index_non_negative"),
    CheckConstraint(
        f"length(state_id) BETWEEN 1 AND {MAX_STATE_ID_LENGTH}", name="state_id_length"
    ),
    postgresql_with={"fillfactor": COUNTER_FILLFACTOR},
)

calls = Table(
    "calls",
    metadata,
    Column("call_id", Text, primary_key=True),
    Column(
        "state_id",
        Text,
        ForeignKey(call_index_counters.c.state_id, ondelete="RESTRICT"),
        nullable=False,
    ),
    Column("call_index", BigInteger, nullable=False),
    Column("call_type", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("request", _json, nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("response", _json, nullable=True),
    Column("response_hash", String(64), nullable=True),
    Column("error", _json, nullable=True),
    Column("error_hash", String(64), nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    # PostgreSQL: the login role that recorded the call (session_user); only
    # it may finish the call through callindex_finish_call.
    Column("recorded_by", Text, nullable=True),
    # How the row's hashes were made (callindex.payloads.HASH_SCHEMES).
    Column("hash_scheme", Text, nullable=False, server_default=LEGACY_SCHEME),
    UniqueConstraint("state_id", "call_index"),
    CheckConstraint("call_index >= 0", name="call_index_non_negative"),
    CheckConstraint(
        "status IN ({})".format(", ".join(f"'{s}'" for s in CALL_STATUSES)),
        name="status_known",
    ),
    CheckConstraint(
        "hash_scheme IN ({})".format(", ".join(f"'{s}'" for s in (LEGACY_SCHEME, SCHEME))),
        name="hash_scheme_known",
    ),
)

# Which entry-point versions (interfaces) each schema revision serves: a
# library meeting a revision newer than it knows writes only while that
# revision still serves its interface (callindex.migrations.check).
schema_interfaces = Table(
    "callindex_schema_interfaces",
    metadata,
    Column("revision", String(32), primary_key=True),
    Column("interface", Integer, primary_key=True),
)

# The head of each state's hash chain, one row per seal (callindex.seals).
call_seals = Table(
    "call_seals",
    metadata,
    Column("state_id", Text, primary_key=True),
    Column("last_index", BigInteger, primary_key=True),
    Column("head", String(64), nullable=False),
    Column("calls", BigInteger, nullable=False),
    Column("sealed_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    CheckConstraint("length(head) = 64", name="head_sha256"),
    CheckConstraint("calls >= 1", name="calls_positive"),
)

# Each range of a state's indices whose calls were purged (callindex.purges);
# ``head`` is the seal chain's head after the range, for a sealed state.
call_purges = Table(
    "call_purges",
    metadata,
    Column("state_id", Text, primary_key=True),
    Column("first_index", BigInteger, primary_key=True),
    Column("last_index", BigInteger, nullable=False),
    Column("calls", BigInteger, nullable=False),
    Column("head", String(64), nullable=True),
    Column("purged_before", DateTime(timezone=True), nullable=False),
    Column("purged_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Column("purged_by", Text, nullable=False),
    CheckConstraint("0 <= first_index AND first_index <= last_index", name="range"),
    CheckConstraint("1 <= calls AND calls <= last_index - first_index + 1", name="calls"),
    CheckConstraint("head IS NULL OR length(head) = 64", name="head_sha256"),
)

# SQLite: the guard of calls lets a DELETE through only while the purge's own
# transaction holds a row here (PostgreSQL uses a transaction-local setting).
purging = Table(
    "callindex_purging",
    metadata,
    Column("purge", Integer, nullable=False),
    info={"backends": ("sqlite",)},
)


def on_backend(table: Table, backend: str) -> bool:
    """Whether ``table`` exists on ``backend`` (``"postgresql"`` or ``"sqlite"``)."""
    return backend in table.info.get("backends", (backend,))


# Sweeping and verifying look for old pending calls; finished ones are the bulk.
Index(
    "ix_calls_pending_created_at",
    calls.c.created_at,
    postgresql_where=text("status = 'pending'"),
    sqlite_where=text("status = 'pending'"),
)

# Replay looks calls up by the hash of their request.
Index("ix_calls_request_hash", calls.c.request_hash)
