"""Retention: ``purge`` removes finished calls older than a bound, never an
index. Counters stay, every purged run is recorded in ``call_purges``,
``verify`` explains purged runs instead of reporting gaps, and a sealed
state's seals stay verifiable for what remains."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from test_seals import as_superuser_without_triggers

from callindex import (
    AsyncCallRecorder,
    CallRecorder,
    ImmutableCallError,
    ImmutablePurgeError,
    IndexTakenError,
    InvalidInputError,
    PermissionDeniedError,
    seals,
)
from callindex.cli import cli
from callindex.database import Database
from callindex.seals import read_heads

from conftest import as_role, assert_trail_sound, call_rows, counter_value
from workers import record_many, run_workers

OLD = 0.4  # seconds: calls recorded before the pause are this much older


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def _purges(url: str) -> list[tuple[str, int, int, int, bool]]:
    return [
        (state, first, last, calls, head is not None)
        for state, first, last, calls, head in _rows(
            url,
            "SELECT state_id, first_index, last_index, calls, head FROM call_purges "
            "ORDER BY state_id, first_index",
        )
    ]


def _run(url: str, sql: str) -> None:
    """``sql`` through callindex's error translation."""
    db = Database(url)
    try:
        db.run(lambda statements: statements.connection.execute(text(sql)))
    finally:
        db.dispose()


@pytest.fixture
def aged(db_url: str) -> CallRecorder:
    """State a: calls 0..4 old, 5 pending (old), 6 old, then 7 new; state b:
    0..4 old; state keep-1: 0..1 old. "Old" means at least OLD seconds."""
    recorder = CallRecorder(db_url, auto_open=True)
    for n in range(5):
        recorder.record_call("a", "http", "success", {"n": n})
        recorder.record_call("b", "http", "error", {"n": n}, error={"e": n})
    recorder.begin_call("a", "llm", {"pending": True})
    recorder.record_call("a", "http", "success", {"n": 6})
    for n in range(2):
        recorder.record_call("keep-1", "http", "success", {"n": n})
    time.sleep(OLD)
    recorder.record_call("a", "http", "success", {"n": 7})
    return recorder


class TestPurging:
    def test_removes_finished_calls_older_than_the_bound_and_records_each_run(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            purged = aged.purge(OLD / 2)
        assert [(p.state_id, p.first_index, p.last_index, p.calls) for p in purged] == [
            ("a", 0, 4, 5),  # the pending call at 5 ends the run
            ("a", 6, 6, 1),
            ("b", 0, 4, 5),
            ("keep-1", 0, 1, 2),
        ]
        assert all(p.head is None and p.purged_by for p in purged)
        assert _purges(db_url) == [
            (p.state_id, p.first_index, p.last_index, p.calls, False) for p in purged
        ]
        assert [(s, i, status) for _, s, i, status in call_rows(db_url)] == [
            ("a", 5, "pending"),
            ("a", 7, "success"),
        ]

    def test_keeps_every_counter_so_no_index_is_handed_out_again(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            counters = {s: counter_value(db_url, s) for s in ("a", "b", "keep-1")}
            aged.purge(OLD / 2)
            assert {s: counter_value(db_url, s) for s in counters} == counters
            assert aged.record_call("b", "http", "success", {}).call_index == 5
            assert aged.allocate_call_index("keep-1") == 2
            with pytest.raises(IndexTakenError, match="taken"):
                aged.record_call("b", "http", "success", {"again": 1}, call_index=3)
        assert _rows(db_url, "SELECT count(*) FROM calls WHERE state_id = 'b'") == [(1,)]

    def test_a_writer_that_names_a_purged_index_is_refused(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            aged.purge(OLD / 2)
        if db_url.startswith("sqlite"):  # on PostgreSQL only the owner inserts unvouched
            with pytest.raises(IndexTakenError, match="purged"):
                _run(
                    db_url,
                    "INSERT INTO calls (call_id, state_id, call_index, call_type, status) "
                    "VALUES ('planted', 'b', 2, 'http', 'success')",
                )
        assert _rows(db_url, "SELECT count(*) FROM calls WHERE call_id = 'planted'") == [(0,)]

    def test_verify_explains_purged_runs_instead_of_gaps(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            aged.allocate_call_index("b", 2)  # 5..6 reserved, never used: still reported
            aged.purge(OLD / 2)
            report = aged.verify()
        assert report.ok, report.as_json()
        assert report.gaps == []
        assert [(u["state_id"], u["first_unused"], u["last_unused"]) for u in
                report.unused_reservations] == [("b", 5, 6)]  # fmt: skip
        assert [(p["state_id"], p["first_index"], p["last_index"]) for p in report.purged] == [
            ("a", 0, 4),
            ("a", 6, 6),
            ("b", 0, 4),
            ("keep-1", 0, 1),
        ]

    def test_only_states_with_the_prefix(self, aged: CallRecorder, db_url: str) -> None:
        with aged:
            purged = aged.purge(0, state_prefix="keep-")
        assert {p.state_id for p in purged} == {"keep-1"}
        assert {s for _, s, _, _ in call_rows(db_url)} == {"a", "b"}

    def test_nothing_older_than_the_bound_is_nothing_purged(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            assert aged.purge(3600) == []
        assert len(call_rows(db_url)) == 15
        assert _purges(db_url) == []

    @pytest.mark.parametrize("seconds", [-1, float("nan"), "1d", True])
    def test_a_bad_bound_is_refused_before_anything_is_written(
        self, aged: CallRecorder, db_url: str, seconds: Any
    ) -> None:
        with aged, pytest.raises(InvalidInputError):
            aged.purge(seconds)
        assert len(call_rows(db_url)) == 15

    def test_the_async_recorder_purges_too(self, aged: CallRecorder, db_url: str) -> None:
        aged.close()

        async def main() -> int:
            async with AsyncCallRecorder(db_url) as recorder:
                return sum(p.calls for p in await recorder.purge(OLD / 2))

        assert asyncio.run(main()) == 13


class TestTheGuards:
    def test_a_call_cannot_be_deleted_outside_a_purge(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        aged.close()
        with pytest.raises(ImmutableCallError):
            _run(db_url, "DELETE FROM calls WHERE state_id = 'b'")
        assert len(call_rows(db_url)) == 15

    @pytest.mark.parametrize(
        "statement", ["UPDATE call_purges SET calls = 1", "DELETE FROM call_purges"]
    )
    def test_a_purge_record_is_never_changed_or_deleted(
        self, aged: CallRecorder, db_url: str, statement: str
    ) -> None:
        with aged:
            aged.purge(OLD / 2)
        with pytest.raises(ImmutablePurgeError, match="never changed"):
            _run(db_url, statement)
        assert len(_purges(db_url)) == 4

    def test_the_application_role_cannot_purge_and_the_auditor_reads_purges(
        self, roles: str
    ) -> None:
        with CallRecorder(roles) as owner:
            owner.record_call("s", "http", "success", {})
            time.sleep(0.05)
        with (
            CallRecorder(as_role(roles, "callindex_test_app")) as app,
            pytest.raises(PermissionDeniedError, match="only the owner"),
        ):
            app.purge(0)
        with CallRecorder(roles) as owner:
            assert [p.state_id for p in owner.purge(0)] == ["s"]
        with CallRecorder(as_role(roles, "callindex_test_auditor")) as auditor:
            report = auditor.verify(seals=True)
        assert report.ok and [p["state_id"] for p in report.purged] == ["s"]
        with (
            CallRecorder(as_role(roles, "callindex_test_app")) as app,
            pytest.raises(IndexTakenError),
        ):
            app.record_call("s", "http", "success", {}, call_index=0)


class TestSealedStates:
    def test_a_sealed_state_gives_up_only_its_sealed_calls(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            (sealed,) = aged.seal("b")
            aged.record_call("b", "http", "success", {"after": "seal"})  # 5, unsealed
            time.sleep(OLD)
            purged = {p.state_id: p for p in aged.purge(OLD / 2)}
        assert (purged["b"].first_index, purged["b"].last_index) == (0, 4)
        assert purged["b"].head == sealed.head  # the chain's head after the run
        assert [i for _, s, i, _ in call_rows(db_url) if s == "b"] == [5]

    def test_the_seals_stay_verifiable_for_what_remains(
        self, aged: CallRecorder, db_url: str, tmp_path: Any
    ) -> None:
        heads = tmp_path / "heads.jsonl"
        with aged:
            exported = aged.seal("b")
            for n in range(3):
                aged.record_call("b", "http", "success", {"later": n})  # 5..7
            exported += aged.seal("b")
            time.sleep(OLD)
            aged.record_call("b", "http", "success", {"newest": 1})  # 8, new and unsealed
            purged = [p for p in aged.purge(OLD / 2 + 0.1) if p.state_id == "b"]
            heads.write_text("\n".join(json.dumps(s.as_json()) for s in exported))
            report = aged.verify(seals=True, heads=read_heads(heads))
            assert report.ok and report.seals_checked == 2, report.as_json()
            # Extended and sealed after the purge: the chain goes on from the purge's head.
            exported += aged.seal("b")
            assert exported[-1].last_index == 8 and exported[-1].calls == 9
            assert aged.verify(seals=True).ok
        assert [(p.first_index, p.last_index) for p in purged] == [(0, 7)]

    def test_tampering_with_what_remains_is_still_detected(
        self, aged: CallRecorder, db_url: str
    ) -> None:
        with aged:
            aged.seal("b")
            for n in range(3):
                aged.record_call("b", "http", "success", {"later": n})  # 5..7: young
            aged.seal("b")
            aged.purge(OLD / 2)  # only 0..4 of b
            with as_superuser_without_triggers(db_url) as conn:
                conn.execute(text("UPDATE calls SET latency_ms = 9 WHERE call_index = 6"))
            (found,) = aged.verify(seals=True).seal_mismatches
        assert (found["state_id"], found["last_index"]) == ("b", 7)

    def test_a_forged_purge_head_is_detected(self, aged: CallRecorder, db_url: str) -> None:
        with aged:
            aged.seal("b")
            aged.record_call("b", "http", "success", {"later": 1})  # 5: young
            aged.seal("b")
            aged.purge(OLD / 2)  # 0..4 of b
            with as_superuser_without_triggers(db_url) as conn:
                conn.execute(text(f"UPDATE call_purges SET head = '{'0' * 64}'"))
            found = aged.verify(seals=True).seal_mismatches
        # The seal at 4 no longer matches the run's head, and the chain from
        # the forged head no longer reaches the seal at 5.
        assert [(f["state_id"], f["last_index"]) for f in found] == [("b", 4), ("b", 5)]

    def test_a_later_run_chains_on_from_the_last_seal_before_it(
        self, aged: CallRecorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Recording a run's head walks the chain from the state's last seal
        below the run (a seal at a purged run's end included), not from the
        genesis: the purger holds the state's counter meanwhile."""
        walked_from: list[int | None] = []
        walk = seals.walk

        def spy(statements: Any, state_id: str, *, after: Any = None) -> Any:
            walked_from.append(None if after is None else after.index)
            return walk(statements, state_id, after=after)

        with aged:
            aged.seal("b")  # at 4
            for n in range(3):
                aged.record_call("b", "http", "success", {"later": n})  # 5..7
            (second,) = aged.seal("b")
            aged.record_call("b", "http", "success", {"newest": 1})  # 8
            aged.seal("b")
            monkeypatch.setattr(seals, "walk", spy)
            first = [p for p in aged.purge(OLD / 2) if p.state_id == "b"]  # 0..4
            time.sleep(OLD)
            later = [p for p in aged.purge(OLD / 2) if p.state_id == "b"]  # 5..8
            monkeypatch.undo()
            assert aged.verify(seals=True).ok
        assert [(p.first_index, p.last_index) for p in first + later] == [(0, 4), (5, 8)]
        assert later[0].head is not None and walked_from[-1] == 4
        assert second.last_index == 7


def test_the_command_line_purges_and_verify_shows_the_runs(aged: CallRecorder, db_url: str) -> None:
    aged.close()
    runner = CliRunner()
    result = runner.invoke(cli, ["--db", db_url, "purge", "--before", "0.2s", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["state_id"], r["first_index"], r["calls"]) for r in lines] == [
        ("a", 0, 5),
        ("a", 6, 1),
        ("b", 0, 5),
        ("keep-1", 0, 2),
    ]
    assert "13 calls purged from 3 states" in result.stderr
    shown = runner.invoke(cli, ["--db", db_url, "verify"])
    assert shown.exit_code == 0, shown.output
    assert "4 runs of indices whose calls were purged" in shown.stdout
    assert "0 gaps between recorded calls" in shown.stdout
    bad = runner.invoke(cli, ["--db", db_url, "purge", "--before", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_purging_while_processes_record_loses_and_duplicates_nothing(db_url: str) -> None:
    """Four processes record on two shared states while purges run every
    50 ms: afterwards every acknowledged call is in the table or inside a
    purged run, no index is held twice (by calls or runs), and verify passes."""
    with CallRecorder(db_url) as recorder:
        for state_id in ("hot", "cold"):
            recorder.open_state(state_id)
    stop = threading.Event()
    purged: list[Any] = []

    def purge_repeatedly() -> None:
        with CallRecorder(db_url) as purger:
            while not stop.is_set():
                purged.extend(purger.purge(0.02))
                time.sleep(0.05)

    purging = threading.Thread(target=purge_repeatedly)
    purging.start()
    try:
        plans = [(db_url, f"w{n}", ["hot", "cold"], 150) for n in range(4)]
        results = run_workers(record_many, plans, timeout=240)
    finally:
        stop.set()
        purging.join()
    acknowledged: dict[str, tuple[str, int]] = {}
    for result in results:
        acknowledged.update({cid: (s, i) for cid, (s, i) in result["acknowledged"].items()})
    assert len(acknowledged) == 600
    assert purged, "no purge ran while the workers recorded"
    runs = _rows(db_url, "SELECT state_id, first_index, last_index, calls FROM call_purges")
    held = {(s, i) for _, s, i, _ in call_rows(db_url)}
    in_runs = {(s, i) for s, first, last, _ in runs for i in range(first, last + 1)}
    assert not held & in_runs  # an index is held by a call or by a purged run, never both
    assert sum(calls for *_, calls in runs) + len(held) == 600  # nothing lost
    assert set(acknowledged.values()) <= held | in_runs
    remaining = {cid: where for cid, where in acknowledged.items() if where in held}
    assert_trail_sound(db_url, remaining, gapless=False)  # purged runs are the only gaps
    with CallRecorder(db_url) as recorder:
        assert recorder.verify().gaps == []


def _wait_until_blocked(url: str, count: int) -> None:
    """Until ``count`` other sessions of this database wait for a lock."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        waiting = _rows(
            url,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )[0][0]
        if waiting >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{count} sessions never waited for a lock")


def _holding_a_run(state_id: str, last_index: int, calls: int) -> str:
    """An uncommitted purge record of ``state_id``'s run from 0: a purge that
    records the same run waits for it, holding the state's counter."""
    return (
        "INSERT INTO call_purges (state_id, first_index, last_index, calls, purged_before, "
        f"purged_by) VALUES ('{state_id}', 0, {last_index}, {calls}, now(), 'holder')"
    )


def _interleaved(url: str, hold: str, first: Callable[[], None], then: Callable[[], None]) -> None:
    """A test connection runs ``hold`` (an INSERT left uncommitted); ``first``
    runs until it waits on that key, ``then`` until it waits too; the key is
    released and both run to their end."""
    with CallRecorder(url) as owner, owner.engine.connect() as holder:
        holder.execute(text(hold))
        threads = []
        for waiting, work in enumerate((first, then), start=1):
            threads.append(threading.Thread(target=work))
            threads[-1].start()
            _wait_until_blocked(url, waiting)
        holder.rollback()
        for thread in threads:
            thread.join(30)


def _purging(url: str, seconds: float, outcome: dict[str, Any]) -> Callable[[], None]:
    """Work for a thread: purge calls at least ``seconds`` old into ``outcome``."""

    def purge() -> None:
        with CallRecorder(url) as purger:
            outcome["purged"] = purger.purge(seconds)

    return purge


class TestRacesWithRecordingAtAnIndex:
    """record_call(call_index=k) and purge of the same state, each caught
    holding the state's counter while the other arrives (PostgreSQL: on
    SQLite one write transaction holds the whole file)."""

    @pytest.fixture
    def reserved(self, postgresql_url: str) -> str:
        """State s: calls 0 and 1, index 2 handed out but not recorded, call 3."""
        with CallRecorder(postgresql_url, auto_open=True) as recorder:
            for n in range(2):
                recorder.record_call("s", "http", "success", {"n": n})
            assert recorder.allocate_call_index("s") == 2
            recorder.record_call("s", "http", "success", {"n": 3})
        return postgresql_url

    @pytest.mark.parametrize("api", ["sync", "async"])
    def test_an_index_purged_while_recording_waits_is_refused(
        self, reserved: str, api: str
    ) -> None:
        url = reserved
        outcome: dict[str, Any] = {}

        async def record_at_two_async() -> Any:
            async with AsyncCallRecorder(url) as recorder:
                return await recorder.record_call("s", "http", "success", {"n": 2}, call_index=2)

        def record_at_two() -> None:
            try:
                if api == "async":
                    outcome["recorded"] = asyncio.run(record_at_two_async())
                else:
                    with CallRecorder(url) as recorder:
                        outcome["recorded"] = recorder.record_call(
                            "s", "http", "success", {"n": 2}, call_index=2
                        )
            except IndexTakenError as error:
                outcome["refused"] = error

        # The purge waits to record its run, holding the counter.
        _interleaved(url, _holding_a_run("s", 3, 3), _purging(url, 0, outcome), record_at_two)
        assert [(run.first_index, run.last_index, run.calls) for run in outcome["purged"]] == [
            (0, 3, 3)
        ]
        assert "refused" in outcome and "recorded" not in outcome
        assert call_rows(url) == []
        with CallRecorder(url) as recorder:
            report = recorder.verify()
        assert report.gaps == [] and report.duplicates == []

    @pytest.mark.parametrize("default_isolation", ["read committed", "repeatable read"])
    def test_a_call_recorded_while_the_purge_waits_is_seen_by_it(
        self, reserved: str, default_isolation: str
    ) -> None:
        """Whatever the database's default isolation."""
        url = reserved
        setting = f"SET default_transaction_isolation = ''{default_isolation}''"
        _run(
            url,
            "DO $$ BEGIN EXECUTE format("
            f"'ALTER DATABASE %I {setting}', current_database()); END $$",
        )
        outcome: dict[str, Any] = {}

        def record_at_two() -> None:
            with CallRecorder(url) as recorder:
                outcome["recorded"] = recorder.record_call(
                    "s", "http", "success", {"n": 2}, call_id="late", call_index=2
                )

        # The recording waits on its call_id, holding the counter.
        late = (
            "INSERT INTO calls (call_id, state_id, call_index, call_type, status, request) "
            "VALUES ('late', 's', 99, 'http', 'pending', '{}')"
        )
        _interleaved(url, late, record_at_two, _purging(url, 0, outcome))
        assert outcome["recorded"].call_index == 2
        held = {index for _, state, index, _ in call_rows(url) if state == "s"}
        runs = _purges(url)
        in_runs = {i for _, first, last, _, _ in runs for i in range(first, last + 1)}
        assert not held & in_runs  # the call at 2 is either purged with its run or stays whole
        assert len(held) + sum(calls for *_, calls, _ in runs) == 4
        with CallRecorder(url) as recorder:
            report = recorder.verify()
        assert report.gaps == [] and report.duplicates == []


def _deadlocks(url: str) -> int:
    (row,) = _rows(url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    return int(row[0])


def test_dropping_a_month_never_deadlocks_with_a_writer_of_its_states(
    postgresql_url: str,
) -> None:
    """The drop is caught holding its locks (recording its run waits) while a
    writer of the same state arrives: the writer waits for calls, not for the
    counter with calls in hand, so the drop finishes and then the writer."""
    from test_partitions import _partition, _record_long_ago

    url = postgresql_url
    _record_long_ago(url, "old-1", 5)
    _partition(url)
    deadlocks = _deadlocks(url)
    outcome: dict[str, Any] = {}

    def record() -> None:
        with CallRecorder(url) as recorder:
            outcome["recorded"] = recorder.record_call("old-1", "http", "success", {})

    hold = _holding_a_run("old-1", 4, 5)
    _interleaved(url, hold, _purging(url, 30 * 86400, outcome), record)
    assert [(run.first_index, run.last_index, run.calls) for run in outcome["purged"]] == [
        (0, 4, 5)
    ]
    assert outcome["recorded"].call_index == 5
    time.sleep(0.5)  # the sessions' statistics reach pg_stat_database as they end
    assert _deadlocks(url) == deadlocks


def test_verify_reads_one_snapshot_while_states_are_purged(db_url: str) -> None:
    """verify runs while a purger records and purges state after state: every
    report explains each purged run (none half-seen as a gap)."""
    stop = threading.Event()
    done: list[int] = []

    def record_and_purge() -> None:
        with CallRecorder(db_url, auto_open=True) as recorder:
            n = 0
            while not stop.is_set():
                for _ in range(4):
                    recorder.record_call(f"s{n:04d}", "http", "success", {})
                recorder.purge(0, state_prefix=f"s{n:04d}")
                done.append(n)
                n += 1

    purging = threading.Thread(target=record_and_purge)
    purging.start()
    reports = []
    try:
        with CallRecorder(db_url) as checker:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                reports.append(checker.verify())
    finally:
        stop.set()
        purging.join()
    assert len(done) > 20 and len(reports) > 20
    unexplained = [
        (r.gaps, r.unused_reservations) for r in reports if r.gaps or r.unused_reservations
    ]
    assert unexplained == []


def test_a_direct_insert_at_an_index_purged_meanwhile_is_refused(roles: str) -> None:
    """A pipeline role's own INSERT at a reserved index arrives while a purge
    holding the state's counter records the run that covers it: the vouch
    trigger waits for the counter, then sees the run (CX009)."""
    url = roles
    with CallRecorder(url) as owner:
        for n in range(2):
            owner.record_call("s", "http", "success", {"n": n})
        assert owner.allocate_call_index("s") == 2
        owner.record_call("s", "http", "success", {"n": 3})
    outcome: dict[str, Any] = {}

    def insert_at_two() -> None:
        try:
            _run(
                as_role(url, "callindex_test_app"),
                "INSERT INTO calls (call_id, state_id, call_index, call_type, status, request) "
                "VALUES ('direct', 's', 2, 'http', 'success', '{}')",
            )
        except IndexTakenError as error:
            outcome["refused"] = error

    _interleaved(url, _holding_a_run("s", 3, 3), _purging(url, 0, outcome), insert_at_two)
    assert [(run.first_index, run.last_index) for run in outcome["purged"]] == [(0, 3)]
    assert "refused" in outcome
    assert [i for _, s, i, _ in call_rows(url) if s == "s"] == []


def test_a_month_is_not_dropped_under_a_transaction_holding_a_counter(
    postgresql_url: str,
) -> None:
    """A caller's transaction has allocated an index (allocate_call_index with
    connection=) and inserts its call after the purge began: the purge does
    not wait for that counter holding calls (a deadlock), it purges the month
    row by row once the transaction commits."""
    from test_partitions import _partition, _record_long_ago

    url = postgresql_url
    _record_long_ago(url, "old-1", 5)
    _partition(url)
    deadlocks = _deadlocks(url)
    outcome: dict[str, Any] = {}
    with CallRecorder(url) as owner, owner.engine.connect() as caller:
        index = owner.allocate_call_index("old-1", connection=caller)
        purging = threading.Thread(target=_purging(url, 30 * 86400, outcome))
        purging.start()
        _wait_until_blocked(url, 1)
        caller.execute(
            text(
                "INSERT INTO calls (call_id, state_id, call_index, call_type, status, "
                "hash_scheme) VALUES ('mine', 'old-1', :index, 'http', 'pending', 'rfc8785')"
            ),
            {"index": index},
        )
        caller.commit()
        purging.join(30)
    assert [(run.first_index, run.last_index, run.calls) for run in outcome["purged"]] == [
        (0, 4, 5)
    ]
    assert [(s, i) for _, s, i, _ in call_rows(url)] == [("old-1", 5)]
    time.sleep(0.5)
    assert _deadlocks(url) == deadlocks
