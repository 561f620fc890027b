"""Database URLs: parsing, the two supported backends, and their display form."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from callindex.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy import URL

DEFAULT_URL: Final = "sqlite:///callindex.db"
URL_ENVIRONMENT_VARIABLE: Final = "CALLINDEX_DATABASE_URL"


def display_url(url: URL) -> str:
    """``url`` for messages and logs: no password, no secret query values."""
    from callindex.redaction import is_sensitive

    query = {k: ("***" if is_sensitive(k) else v) for k, v in url.query.items()}
    return url.set(query=query).render_as_string(hide_password=True)


def parse_url(url: str | URL) -> URL:
    """Parse and normalise a database URL, or raise :class:`ConfigurationError`.

    ``postgresql://`` and ``postgres://`` select psycopg 3; only the
    ``postgresql+psycopg`` and ``sqlite``/``sqlite+pysqlite`` forms are accepted.
    """
    # Imported here: the command line reads this module's constants at start-up.
    from sqlalchemy import exc, make_url

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018  (a non-numeric port raises here)
    except (exc.ArgumentError, ValueError) as error:
        # The text is not echoed: whatever it holds may include a password.
        raise ConfigurationError(
            "not a database URL (expected postgresql+psycopg://USER@HOST/DB or sqlite:///FILE)"
        ) from error
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    if backend in ("postgresql", "postgres"):
        if "+" in parsed.drivername and driver != "psycopg":
            raise ConfigurationError(
                f"unsupported PostgreSQL driver {driver!r}: use postgresql+psycopg://"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver != "pysqlite":
            raise ConfigurationError(f"unsupported SQLite driver {driver!r}: use sqlite:///FILE")
        return parsed
    raise ConfigurationError(
        f"unsupported database {backend!r}: callindex runs on PostgreSQL "
        "(postgresql+psycopg://...) and SQLite (sqlite:///FILE)"
    )


def sqlite_file(url: URL) -> Path:
    """The file of a SQLite URL; in-memory databases are refused."""
    name = url.database or ""
    if name in ("", ":memory:") or url.query.get("mode") == "memory":
        raise ConfigurationError(
            "an in-memory SQLite database cannot be shared between connections: "
            "use a file, e.g. sqlite:///callindex.db"
        )
    if name.startswith("file:"):
        name = unquote(name.removeprefix("file:"))
    return Path(name).expanduser().resolve()


def anchored(url: URL) -> URL:
    """``url`` with a relative SQLite file made absolute, so that every
    connection of a recorder opens the file that was meant when the recorder
    was made, whatever the working folder is later."""
    if url.get_backend_name() != "sqlite":
        return url
    name = url.database or ""
    if name.startswith("file:") or name in ("", ":memory:") or Path(name).is_absolute():
        return url
    return url.set(database=str(Path(name).expanduser().resolve()))
