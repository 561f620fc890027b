"""Ctrl-C at any moment of `callindex demo`: one line on stderr, exit code 130,
no traceback, and no process of the demo left behind.

The console script runs as a real process in a session of its own, on a real
SQLite file, and the SIGINT goes to its whole process group, workers included,
as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import IO

import pytest

CALLINDEX = Path(sys.executable).parent / "callindex"
INTERRUPTED = "callindex: interrupted"
# Enough work that the demo is still running when the interrupt arrives.
LONG = ("--workers", "2", "--states", "40", "--calls-per-state", "10")
WAIT_SECONDS = 30.0
# A worker started this long ago is still importing its modules: an interrupt
# there, unless the worker is deaf to it, prints a traceback.
SPAWNING_SECONDS = 0.3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="finds the workers in /proc"),
]


class Demo:
    """``callindex demo`` running in ``folder``, its output read as it comes."""

    def __init__(self, folder: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "CALLINDEX_DATABASE_URL"}
        self.process = subprocess.Popen(
            [str(CALLINDEX), "demo", *args],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pgid = self.process.pid
        self.stdout = bytearray()
        self.stderr = bytearray()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=_read, args=(self.process.stdout, self.stdout)),
            threading.Thread(target=_read, args=(self.process.stderr, self.stderr)),
        ]
        for reader in self._readers:
            reader.start()

    def interrupt(self) -> int:
        """Ctrl-C to the whole process group; how much of stderr came before it."""
        before = len(self.stderr)
        os.killpg(self.pgid, signal.SIGINT)
        return before

    def wait(self) -> int:
        """The exit code, once the demo has ended and its output is read (as long as
        no survivor holds it open)."""
        code = self.process.wait(timeout=WAIT_SECONDS)
        for reader in self._readers:
            reader.join(timeout=5.0)
        return code

    def workers(self) -> int:
        """The demo's worker processes alive now (spawned: ``spawn_main`` in their command)."""
        found = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                in_group = os.getpgid(int(pid)) == self.pgid
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            found += in_group and b"spawn_main" in command
        return found

    def group_gone(self, within: float) -> bool:
        """Whether no process of the demo's group is left, waiting up to ``within`` s."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """Whatever is left of the demo's process group, gone."""
        with suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _read(stream: IO[bytes], into: bytearray) -> None:
    while chunk := os.read(stream.fileno(), 4096):
        into.extend(chunk)


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """Start demos in a fresh folder; whatever is left of them at the end is killed."""
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        demo = Demo(tmp_path, *args)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.kill()


def _wait_for(condition: Callable[[], bool], what: str, demo: Demo) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert demo.process.poll() is None, f"the demo ended before {what}: {bytes(demo.stderr)!r}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT_SECONDS:.0f} s"
        time.sleep(0.02)


def _rows(database: Path, table: str) -> int:
    """Rows in ``table`` of the SQLite file ``database`` (0 while it is not there yet)."""
    if not database.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.1)) as conn:
            count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.Error:  # being created, or locked for a moment
        return 0
    return count


def _assert_interrupted(demo: Demo, stderr_before: int) -> None:
    assert demo.wait() == 130, bytes(demo.stderr).decode()
    stdout, stderr = demo.stdout.decode(), demo.stderr.decode()
    assert "Traceback" not in stdout + stderr, stderr
    after = [line for line in demo.stderr[stderr_before:].decode().splitlines() if line.strip()]
    assert after == [INTERRUPTED], stderr
    assert demo.group_gone(within=5.0), "processes of the demo survived the interrupt"


def test_ctrl_c_while_it_starts(run_demo: Callable[..., Demo]) -> None:
    demo = run_demo(*LONG)
    time.sleep(0.3)
    before = demo.interrupt()
    _assert_interrupted(demo, before)
    assert before == 0


def test_ctrl_c_while_workers_spawn(run_demo: Callable[..., Demo]) -> None:
    demo = run_demo(*LONG)
    _wait_for(lambda: demo.workers() >= 1, "worker process", demo)
    time.sleep(SPAWNING_SECONDS)
    before = demo.interrupt()
    _assert_interrupted(demo, before)
    assert before == 0


def test_ctrl_c_while_workers_run(run_demo: Callable[..., Demo], tmp_path: Path) -> None:
    demo = run_demo(*LONG)
    database = tmp_path / "callindex-demo.db"
    _wait_for(lambda: _rows(database, "calls") >= 5, "call recorded", demo)
    before = demo.interrupt()
    _assert_interrupted(demo, before)
    assert before == 0
    assert _rows(database, "calls") >= 5


def test_ctrl_c_during_the_legacy_replay(run_demo: Callable[..., Demo], tmp_path: Path) -> None:
    demo = run_demo("--legacy", "--workers", "2", "--states", "10", "--calls-per-state", "10")
    legacy = tmp_path / "callindex-demo-legacy.db"
    _wait_for(lambda: _rows(legacy, "legacy_calls") >= 5, "legacy row", demo)
    before = demo.interrupt()
    _assert_interrupted(demo, before)
    # Before it: callindex's run, whose last progress line stays.
    shown = [line for line in demo.stderr[:before].decode().splitlines() if line.strip()]
    assert len(shown) == 1 and shown[0].startswith("callindex "), shown


def test_ctrl_c_during_the_verdict(run_demo: Callable[..., Demo]) -> None:
    """The workers are done (their progress line is out): it reads the trail back."""
    demo = run_demo("--workers", "2", "--states", "60", "--calls-per-state", "2")
    _wait_for(lambda: b"\n" in demo.stderr, "progress line", demo)
    before = demo.interrupt()
    _assert_interrupted(demo, before)
    assert "finished in" not in demo.stdout.decode()
