"""A throwaway PostgreSQL server for fault tests.

Fault tests crash the server (``pg_ctl stop -m immediate``) to prove that acknowledged commits
survive. Doing that to the shared server on port 5432 would break everyone else using it, so
this helper runs a private one: own data folder in a temp directory, own free port on 127.0.0.1,
own unix socket folder, all deleted afterwards. PostgreSQL refuses to run as root, so its
binaries run as the ``postgres`` user (via ``runuser``), which owns the temp directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

PG_USER = "postgres"
TIMEOUT = 90  # seconds for any subprocess; pg_ctl waits itself at most 60 (-t 60)
READY_TIMEOUT = 30.0  # seconds to poll for connections after pg_ctl start returned


def _bin_dir() -> Path | None:
    """The highest-versioned /usr/lib/postgresql/<version>/bin that holds an initdb."""
    dirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    return max((d for d in dirs if d.parent.name.isdigit()), key=lambda d: int(d.parent.name),
               default=None)  # fmt: skip


def postgres_binaries_available() -> bool:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return False
    return _bin_dir() is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


class ThrowawayPostgres:
    def __init__(
        self, root: Path, bin_dir: Path, port: int, settings: dict[str, object] | None = None
    ) -> None:
        self.extra_settings = settings or {}
        self.root = root  # owned by postgres; holds data/, the unix socket and server.log
        self.bin_dir = bin_dir
        self.port = port
        self.data_dir = root / "data"
        self.log_file = root / "server.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _failure(self, message: str) -> RuntimeError:
        try:
            tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-30:])
        except OSError as error:
            tail = f"(unreadable: {error})"
        return RuntimeError(f"{message}\n--- tail of {self.log_file} ---\n{tail}")

    def _run(self, tool: str, *args: str, check: bool = True) -> int:
        command = ["runuser", "-u", PG_USER, "--", str(self.bin_dir / tool), *args]
        try:
            done = subprocess.run(
                command, cwd=self.root, check=check, timeout=TIMEOUT, capture_output=True
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = (_text(error.stdout) + _text(error.stderr)).strip()
            raise self._failure(f"{' '.join(command)} failed: {error}\n{output}") from error
        return done.returncode

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", *args)

    def init(self) -> None:
        """initdb, then append this server's settings to postgresql.conf."""
        self._run("initdb", "-D", str(self.data_dir), "-U", PG_USER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "on",  # durability must be real: tests crash the server
            "synchronous_commit": "on",
            "max_connections": 50,
            "shared_buffers": "32MB",
            "logging_collector": "off",  # pg_ctl -l writes the log
            **self.extra_settings,
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        self._pg_ctl("-l", str(self.log_file), "start")
        conninfo = f"host=127.0.0.1 port={self.port} user={PG_USER} dbname=postgres"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                psycopg.connect(conninfo, connect_timeout=1).close()
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise self._failure(f"port {self.port} refuses connections: {error}") from error
                time.sleep(0.2)

    def stop_immediate(self) -> None:
        """Crash-like stop: no shutdown checkpoint, so the next start replays the WAL."""
        self._pg_ctl("-m", "immediate", "stop")

    def stop(self) -> None:
        if self.is_running():
            self._pg_ctl("-m", "fast", "stop")

    def recorded_calls(self) -> int:
        """Rows in ``calls`` right now; 0 while the server is down."""
        conninfo = f"host=127.0.0.1 port={self.port} user={PG_USER} dbname=postgres"
        try:
            with psycopg.connect(conninfo, connect_timeout=2) as conn:
                row = conn.execute("SELECT count(*) FROM calls").fetchone()
                return int(row[0]) if row else 0
        except psycopg.OperationalError:
            return 0

    def crash_at(self, thresholds: tuple[int, ...], crashes: list[int]) -> threading.Thread:
        """A started thread that crashes the server (``stop_immediate``) once
        ``calls`` holds each threshold of rows (whatever the machine's speed),
        restarts it a second later, and appends the rows seen to ``crashes``."""

        def crash() -> None:
            for threshold in thresholds:
                deadline = time.monotonic() + 120
                while self.recorded_calls() < threshold and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.stop_immediate()
                crashes.append(self.recorded_calls())
                time.sleep(1.0)
                self.start()

        thread = threading.Thread(target=crash)
        thread.start()
        return thread

    def is_running(self) -> bool:
        # The exit status is the answer (0 running, 3 stopped), hence no check.
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False) == 0


@contextmanager
def throwaway_postgres(**settings: object) -> Iterator[ThrowawayPostgres]:
    """initdb into a temp folder, start on a free 127.0.0.1 port, yield, stop and delete.
    ``settings`` go to postgresql.conf, after (and over) the defaults."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("no /usr/lib/postgresql/<version>/bin/initdb found")
    user = pwd.getpwnam(PG_USER)
    root = Path(tempfile.mkdtemp(prefix="callindex-pg-"))
    try:
        os.chown(root, user.pw_uid, user.pw_gid)
        server = ThrowawayPostgres(root, bin_dir, _free_port(), settings)
        server.init()
        try:
            server.start()
            yield server
        finally:
            try:
                server.stop()
            except RuntimeError:
                server.stop_immediate()  # fast stop failed or hung: never leave it behind
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ReplicatedPostgres:
    """A throwaway primary and a streaming standby of it, on two ports, and
    the multi-host URL workers use (libpq picks whichever accepts writes)."""

    def __init__(self, primary: ThrowawayPostgres, standby: ThrowawayPostgres) -> None:
        self.primary = primary
        self.standby = standby
        self.down_at = 0.0  # time.time() when the primary was crashed
        self.url = (
            f"postgresql+psycopg://{PG_USER}@/postgres?host=127.0.0.1:{primary.port}"
            f"&host=127.0.0.1:{standby.port}&target_session_attrs=read-write&connect_timeout=2"
        )

    def wait_streaming(self, synchronous: bool) -> None:
        """Until the primary reports the standby streaming (and synchronous)."""
        conninfo = f"host=127.0.0.1 port={self.primary.port} user={PG_USER} dbname=postgres"
        wanted = "sync" if synchronous else "async"
        deadline = time.monotonic() + READY_TIMEOUT
        with psycopg.connect(conninfo, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT state, sync_state FROM pg_stat_replication "
                    "WHERE application_name = 'standby1'"
                ).fetchone()
                if row == ("streaming", wanted):
                    return
                if time.monotonic() > deadline:
                    raise self.standby._failure(f"the standby is not streaming ({row})")
                time.sleep(0.1)

    def fail_over(self) -> float:
        """Crash the primary and promote the standby; the seconds it took."""
        started = time.monotonic()
        self.primary.stop_immediate()
        self.down_at = time.time()
        self.standby._pg_ctl("promote")
        return time.monotonic() - started


@contextmanager
def replicated_postgres(*, synchronous: bool) -> Iterator[ReplicatedPostgres]:
    """A primary with a standby made by ``pg_basebackup``, streaming; with
    ``synchronous``, the standby is the primary's synchronous standby and every
    commit waits until it has the commit on disk."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("no /usr/lib/postgresql/<version>/bin/initdb found")
    primary_settings = {
        "wal_level": "replica",
        "max_wal_senders": 5,
        "wal_keep_size": "'128MB'",
        "hot_standby": "on",
        "synchronous_standby_names": "'standby1'" if synchronous else "''",
    }
    with throwaway_postgres(**primary_settings) as primary:
        user = pwd.getpwnam(PG_USER)
        root = Path(tempfile.mkdtemp(prefix="callindex-standby-"))
        try:
            os.chown(root, user.pw_uid, user.pw_gid)
            standby = ThrowawayPostgres(root, bin_dir, _free_port())
            standby._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port),
                         "-U", PG_USER, "-D", str(standby.data_dir), "-X", "stream",
                         "--no-sync")  # fmt: skip
            (standby.data_dir / "standby.signal").touch()
            os.chown(standby.data_dir / "standby.signal", user.pw_uid, user.pw_gid)
            with (standby.data_dir / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"port = {standby.port}\n"
                    f"unix_socket_directories = '{root}'\n"
                    # Promoted, it has no standby of its own to wait for.
                    "synchronous_standby_names = ''\n"
                    f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user={PG_USER} "
                    "application_name=standby1'\n"
                )
            try:
                standby.start()
                cluster = ReplicatedPostgres(primary, standby)
                cluster.wait_streaming(synchronous)
                yield cluster
            finally:
                try:
                    standby.stop()
                except RuntimeError:
                    standby.stop_immediate()
        finally:
            shutil.rmtree(root, ignore_errors=True)
