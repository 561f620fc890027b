"""A legacy audit database, shaped like the upstream one callindex comes from,
and the legacy writer: indices from an in-process counter seeded once from
``SELECT max(call_index)``, as the upstream fix did.

Shared by ``bench/adoption.py`` and the tests.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
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
    create_engine,
    exc,
    text,
)

legacy_metadata = MetaData()
# The parents, reduced to their keys (upstream they carry much more).
node_states = Table(
    "node_states", legacy_metadata, Column("state_id", String(64), primary_key=True)
)
operations = Table(
    "operations", legacy_metadata, Column("operation_id", String(64), primary_key=True)
)
legacy_calls = Table(
    "calls",
    legacy_metadata,
    Column("call_id", String(64), primary_key=True),
    Column("state_id", String(64), ForeignKey("node_states.state_id"), nullable=True),
    Column("operation_id", String(64), ForeignKey("operations.operation_id"), nullable=True),
    Column("call_index", Integer, nullable=False),
    Column("call_type", String(32), nullable=False),
    Column("status", String(32), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("request_ref", String(256), nullable=True),
    Column("response_hash", String(64), nullable=True),
    Column("response_ref", String(256), nullable=True),
    Column("error_json", Text, nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # A call belongs to a node state or to an operation, never both.
    CheckConstraint("(state_id IS NULL) <> (operation_id IS NULL)", name="calls_one_parent"),
)
Index(
    "ix_calls_state_call_index_unique",
    legacy_calls.c.state_id,
    legacy_calls.c.call_index,
    unique=True,
    postgresql_where=text("state_id IS NOT NULL"),
    sqlite_where=text("state_id IS NOT NULL"),
)
Index(
    "ix_calls_operation_call_index_unique",
    legacy_calls.c.operation_id,
    legacy_calls.c.call_index,
    unique=True,
    postgresql_where=text("operation_id IS NOT NULL"),
    sqlite_where=text("operation_id IS NOT NULL"),
)

LEGACY_INSERT = text(
    "INSERT INTO calls (call_id, state_id, call_index, call_type, status, request_hash, "
    "request_ref, latency_ms, created_at) VALUES (:call_id, :state_id, :call_index, "
    ":call_type, 'success', :request_hash, :request_ref, 12.5, :created_at)"
)


def create_legacy_database(url: str, states: int, calls_per_state: int) -> None:
    """The legacy schema, ``states`` states of ``calls_per_state`` calls
    (indices 0..n-1), and two calls of an operation (no state)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        legacy_metadata.create_all(conn)
        now = datetime.now(UTC)
        states_rows = [{"state_id": f"state-{s}"} for s in range(states)]
        if states_rows:
            conn.execute(node_states.insert(), states_rows)
        conn.execute(operations.insert(), [{"operation_id": "operation-1"}])
        rows = [
            legacy_row(f"legacy-{s}-{i}", f"state-{s}", i, now)
            for s in range(states)
            for i in range(calls_per_state)
        ]
        if rows:
            conn.execute(LEGACY_INSERT, rows)
        conn.execute(
            text(
                "INSERT INTO calls (call_id, operation_id, call_index, call_type, status, "
                "request_hash, created_at) VALUES "
                "('op-0', 'operation-1', 0, 'http', 'success', :hash, :at), "
                "('op-1', 'operation-1', 1, 'http', 'success', :hash, :at)"
            ),
            {"at": now, "hash": "1" * 64},
        )
    engine.dispose()


def legacy_row(call_id: str, state_id: str, call_index: int, at: datetime) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "state_id": state_id,
        "call_index": call_index,
        "call_type": "http",
        "request_hash": "0" * 64,
        "request_ref": f"blob://{call_id}",
        "created_at": at,
    }


def legacy_snapshot(url: str) -> list[tuple[Any, ...]]:
    """Every legacy column of every row, in call_id order."""
    engine = create_engine(url)
    columns = ", ".join(column.name for column in legacy_calls.c)
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(text(f"SELECT {columns} FROM calls"))]
    engine.dispose()
    return sorted(rows, key=lambda row: str(row[0]))


class LegacyWriter:
    """The upstream writer: one in-process counter per state, seeded from
    ``max(call_index)`` the first time a state is seen, incremented per call.
    A unique violation loses the call, as it did upstream."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.next_index: dict[str, int] = {}

    def record(self, state_id: str) -> tuple[str, float] | None:
        """Insert one call; its call_id and the seconds the insert took, or
        ``None`` when the database refused it (the call is lost)."""
        if state_id not in self.next_index:
            with self.engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO node_states (state_id) SELECT CAST(:s AS VARCHAR(64)) "
                        "WHERE NOT EXISTS (SELECT 1 FROM node_states "
                        "WHERE state_id = CAST(:s AS VARCHAR(64)))"
                    ),
                    {"s": state_id},
                )
                seeded = conn.execute(
                    text("SELECT max(call_index) FROM calls WHERE state_id = :s"),
                    {"s": state_id},
                ).scalar()
            self.next_index[state_id] = -1 if seeded is None else int(seeded)
        self.next_index[state_id] += 1
        call_id = f"legacy-{uuid.uuid4().hex}"
        row = legacy_row(call_id, state_id, self.next_index[state_id], datetime.now(UTC))
        started = time.monotonic()
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("PRAGMA busy_timeout = 30000")
                conn.execute(LEGACY_INSERT, row)
        except exc.IntegrityError:
            return None
        return call_id, time.monotonic() - started

    def close(self) -> None:
        self.engine.dispose()
