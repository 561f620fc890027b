"""alembic environment of callindex's own migrations.

Run through :mod:`callindex.migrations`, which passes either a connection
(online) or a dialect URL (offline, to render SQL).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from callindex.schema import metadata, on_backend

config = context.config
version_table = config.get_main_option("version_table") or "callindex_alembic_version"


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        # "named" keeps a literal % in function bodies from being doubled.
        dialect_opts={"paramstyle": "named"},
        # SQLite has transactional DDL too: wrap its script in BEGIN/COMMIT.
        transactional_ddl=True,
        version_table=version_table,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: Connection) -> None:
    backend = connection.dialect.name

    def exists_here(item: Any, name: str | None, kind: str, *_: Any) -> bool:
        return kind != "table" or on_backend(item, backend)

    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=version_table,
        include_object=exists_here,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online(config.attributes["connection"])
