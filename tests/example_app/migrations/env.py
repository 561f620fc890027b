"""The example application's alembic environment, embedding callindex.

Two lines are callindex's: ``include_object`` keeps the application's
autogenerate away from callindex's tables, and ``upgrade_with`` (last, after
the application's own migrations) brings callindex's schema to its head in
callindex's own version table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from callindex.migrations import include_object, upgrade_with

target_metadata = sa.MetaData()
sa.Table("app_items", target_metadata, sa.Column("id", sa.Integer, primary_key=True),
         sa.Column("name", sa.Text, nullable=False))  # fmt: skip

config = context.config
engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "")
with engine.connect() as connection:
    context.configure(
        connection=connection, target_metadata=target_metadata, include_object=include_object
    )
    with context.begin_transaction():
        context.run_migrations()
    # On SQLite alembic does not wrap DDL in its own transaction: it is still
    # open (autobegun) here, and the application's migrations are done.
    if connection.in_transaction():
        connection.commit()
    if context.get_x_argument(as_dictionary=True).get("callindex", "on") == "on":
        upgrade_with(connection)
engine.dispose()
