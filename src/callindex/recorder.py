"""``CallRecorder``: the public face of callindex."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy import URL, Connection, Engine

from callindex import allocator, migrations
from callindex.database import Database


class CallRecorder:
    """Allocates call indices for node states, in the database.

    ``url_or_engine`` is a database URL (``postgresql+psycopg://...`` or
    ``sqlite:///file.db``) or an SQLAlchemy :class:`~sqlalchemy.Engine` for one.
    A recorder holds no per-state data: any number of recorders, in any number
    of processes, may work on the same states at once.
    """

    def __init__(self, url_or_engine: str | URL | Engine) -> None:
        self._db = Database(url_or_engine)

    @property
    def engine(self) -> Engine:
        """The engine in use; open a transaction on it to pass as ``connection=``."""
        return self._db.engine

    def upgrade(self) -> None:
        """Bring the database schema to the newest revision this library ships."""
        migrations.upgrade(self._db)

    def open_state(self, state_id: str, *, connection: Connection | None = None) -> None:
        """Register ``state_id`` so indices can be allocated for it. Idempotent."""
        state_id = allocator.validate_state_id(state_id)
        self._db.write(
            lambda conn: allocator.open_state(conn, state_id),
            connection=connection,
            single_statement=True,
        )

    def allocate_call_index(
        self, state_id: str, count: int = 1, *, connection: Connection | None = None
    ) -> int:
        """Reserve ``count`` consecutive indices of ``state_id`` and return the first.

        Without ``connection`` the reservation commits before this returns.
        With ``connection`` it joins that connection's transaction: it holds the
        state's counter row until the caller commits, and rolls back with it,
        so indices used by rows written in the same transaction have no gaps.
        """
        state_id = allocator.validate_state_id(state_id)
        count = allocator.validate_count(count)
        return self._db.write(
            lambda conn: allocator.allocate(conn, state_id, count),
            connection=connection,
            single_statement=True,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._db.dispose()

    def __enter__(self) -> CallRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CallRecorder({self._db.display_url!r})"
