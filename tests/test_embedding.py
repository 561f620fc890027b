"""An application's own alembic environment embeds callindex: its
`alembic upgrade heads` brings callindex up too, each history in its own
version table, and its autogenerate leaves callindex's tables alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from callindex import CallRecorder, ConfigurationError, migrations
from callindex.database import Database

APP = Path(__file__).resolve().parent / "example_app"


def app_config(url: str) -> Config:
    config = Config(str(APP / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    return config


def test_the_applications_upgrade_brings_callindex_up(empty_db_url: str) -> None:
    if empty_db_url.startswith("sqlite"):
        Database(empty_db_url).prepare_file()
    command.upgrade(app_config(empty_db_url), "heads")
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        app_version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert {"app_items", "calls", "call_index_counters", "alembic_version",
            migrations.VERSION_TABLE} <= tables  # fmt: skip
    assert app_version == "a1"
    assert migrations.check(Database(empty_db_url)).up_to_date
    with CallRecorder(empty_db_url) as recorder:
        recorder.open_state("s1")
        assert recorder.record_call("s1", "http", "success", {}).call_index == 0
    # Running it again changes nothing, for either history.
    command.upgrade(app_config(empty_db_url), "heads")
    assert migrations.check(Database(empty_db_url)).up_to_date


def test_the_applications_autogenerate_leaves_callindex_alone(empty_db_url: str) -> None:
    if empty_db_url.startswith("sqlite"):
        Database(empty_db_url).prepare_file()
    config = app_config(empty_db_url)
    command.upgrade(config, "heads")
    command.check(config)  # raises when autogenerate would drop callindex's tables


def test_upgrade_with_refuses_a_connection_in_a_transaction(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        with pytest.raises(ConfigurationError, match="outside a transaction"):
            migrations.upgrade_with(conn)
    engine.dispose()


def test_a_relative_sqlite_file_is_the_one_meant_when_the_recorder_was_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorders of the same relative URL made in two folders use two files,
    and a recorder keeps its file when the working folder changes."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    with CallRecorder("sqlite:///callindex.db") as in_first:
        in_first.upgrade()
        in_first.open_state("s")
        monkeypatch.chdir(second)
        assert in_first.allocate_call_index("s") == 0  # still the first folder's file
        with CallRecorder("sqlite:///callindex.db") as in_second:
            in_second.upgrade()
            assert not in_second.is_open("s")
    assert (first / "callindex.db").exists() and (second / "callindex.db").exists()
