"""The old way, for the side-by-side replay: indices counted in each process.

Every process keeps a dict ``state_id -> next index`` under a lock, seeded once
per state from ``SELECT MAX(call_index)``, and writes its rows with the index it
chose into a table with the same ``UNIQUE(state_id, call_index)`` as callindex's
``calls``. A unique violation is not retried: that call is missing from the trail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    exc,
    func,
    select,
)

from callindex.demo.verdict import TrailRow
from callindex.errors import DatabaseError
from callindex.urls import parse_url

LEGACY_TABLE: Final = "legacy_calls"


class LegacyCounters:
    """The in-process allocator callindex replaces: one dict per process, under a lock."""

    def __init__(self, seed: Callable[[str], int]) -> None:
        self._seed = seed
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def next_index(self, state_id: str) -> int:
        with self._lock:
            if state_id not in self._next:
                self._next[state_id] = self._seed(state_id)
            index = self._next[state_id]
            self._next[state_id] = index + 1
            return index


class LegacyStore:
    """The legacy audit table ``table_name`` in the database at ``url``."""

    def __init__(self, url: str, table_name: str = LEGACY_TABLE) -> None:
        self.url = parse_url(url)
        self.table = Table(
            table_name,
            MetaData(),
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("state_id", String(255), nullable=False),
            Column("call_index", BigInteger, nullable=False),
            Column("call_type", String(16), nullable=False),
            Column("status", String(16), nullable=False),
            Column("operation_id", String(64), nullable=False),
            Column("attempts", Integer, nullable=False),
            Column("request", JSON),
            Column("created_at", DateTime(timezone=True), server_default=func.now()),
            UniqueConstraint("state_id", "call_index", name=f"uq_{table_name}_state_index"),
        )

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def engine(self) -> Engine:
        connect_args: dict[str, Any] = {"timeout": 30.0} if self.is_sqlite else {}
        return create_engine(self.url, connect_args=connect_args)

    def create(self, engine: Engine) -> None:
        """Create the table if it is missing (and use WAL on a SQLite file)."""
        try:
            if self.is_sqlite:
                with engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            self.table.metadata.create_all(engine)
        except exc.SQLAlchemyError as error:
            raise _legacy_error("could not create", error) from error

    def seed(self, engine: Engine, state_id: str) -> int:
        """The first index a process hands out for ``state_id``: ``MAX(call_index) + 1``."""
        with engine.connect() as conn:
            highest = conn.execute(
                select(func.max(self.table.c.call_index)).where(self.table.c.state_id == state_id)
            ).scalar_one_or_none()
        return 0 if highest is None else int(highest) + 1

    def insert(self, engine: Engine, **values: Any) -> bool:
        """Write one row; ``False`` when the unique constraint refuses it (the call is lost)."""
        try:
            with engine.begin() as conn:
                conn.execute(self.table.insert().values(**values))
        except exc.IntegrityError:
            return False
        return True

    def rows(self, engine: Engine, state_prefix: str) -> list[TrailRow]:
        """The rows of the states whose id starts with ``state_prefix``."""
        table = self.table
        query = (
            select(
                table.c.state_id,
                table.c.call_index,
                table.c.call_type,
                table.c.status,
                table.c.operation_id,
                table.c.attempts,
            )
            .where(table.c.state_id.startswith(state_prefix, autoescape=True))
            .order_by(table.c.state_id, table.c.call_index)
        )
        try:
            with engine.connect() as conn:
                return [
                    TrailRow(
                        r.state_id,
                        int(r.call_index),
                        r.call_type,
                        r.status,
                        r.operation_id,
                        int(r.attempts),
                    )
                    for r in conn.execute(query)
                ]
        except exc.SQLAlchemyError as error:
            raise _legacy_error("could not read", error) from error


def _legacy_error(what: str, error: exc.SQLAlchemyError) -> DatabaseError:
    detail = str(getattr(error, "orig", None) or error).strip().splitlines()
    return DatabaseError(f"legacy replay {what} its table: {detail[0] if detail else error}")
