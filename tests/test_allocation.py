"""Allocation: one counter per state, bumped atomically, continued by anyone."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import text

from callindex import CallRecorder, UnknownStateError

from conftest import counter_value


def test_indices_start_at_zero_and_increase_by_one(recorder: CallRecorder) -> None:
    recorder.open_state("s1")
    assert [recorder.allocate_call_index("s1") for _ in range(5)] == [0, 1, 2, 3, 4]


def test_each_state_has_its_own_sequence(recorder: CallRecorder) -> None:
    recorder.open_state("a")
    recorder.open_state("b")
    assert [recorder.allocate_call_index(s) for s in "abab"] == [0, 0, 1, 1]


def test_count_reserves_a_block_and_returns_its_first_index(recorder: CallRecorder) -> None:
    recorder.open_state("s1")
    assert recorder.allocate_call_index("s1", count=10) == 0
    assert recorder.allocate_call_index("s1") == 10
    assert recorder.allocate_call_index("s1", count=3) == 11
    assert counter_value(recorder.engine.url, "s1") == 14


def test_open_state_is_idempotent_and_keeps_the_counter(recorder: CallRecorder) -> None:
    recorder.open_state("s1")
    recorder.allocate_call_index("s1", count=7)
    recorder.open_state("s1")
    assert recorder.allocate_call_index("s1") == 7


def test_unknown_state_raises_naming_the_state(recorder: CallRecorder, db_url: str) -> None:
    with pytest.raises(UnknownStateError, match="'never-opened'") as raised:
        recorder.allocate_call_index("never-opened")
    assert raised.value.state_id == "never-opened"
    assert counter_value(db_url, "never-opened") is None


def test_two_recorders_in_one_process_share_the_sequence(db_url: str) -> None:
    with CallRecorder(db_url) as first, CallRecorder(db_url) as second:
        first.open_state("s1")
        second.open_state("s1")
        got = [r.allocate_call_index("s1") for r in (first, second, first, second)]
    assert got == [0, 1, 2, 3]


def test_a_fresh_process_continues_the_sequence(recorder: CallRecorder, db_url: str) -> None:
    recorder.open_state("s1")
    assert recorder.allocate_call_index("s1", count=5) == 0
    recorder.close()
    restarted = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from callindex import CallRecorder; "
            "print(CallRecorder(sys.argv[1]).allocate_call_index('s1'))",
            db_url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert restarted.stdout.strip() == "5"
    assert recorder.allocate_call_index("s1") == 6


def test_an_engine_can_be_passed_instead_of_a_url(db_url: str) -> None:
    with CallRecorder(db_url) as by_url:
        by_url.open_state("s1")
        with CallRecorder(by_url.engine) as by_engine:
            assert by_engine.allocate_call_index("s1") == 0
        assert by_url.allocate_call_index("s1") == 1


class TestInsideTheCallersTransaction:
    def test_allocation_commits_with_the_caller(self, recorder: CallRecorder) -> None:
        recorder.open_state("s1")
        with recorder.engine.begin() as conn:
            assert recorder.allocate_call_index("s1", connection=conn) == 0
            assert recorder.allocate_call_index("s1", connection=conn) == 1
        assert recorder.allocate_call_index("s1") == 2

    def test_allocation_rolls_back_with_the_caller(self, recorder: CallRecorder) -> None:
        recorder.open_state("s1")
        with pytest.raises(RuntimeError), recorder.engine.begin() as conn:
            assert recorder.allocate_call_index("s1", connection=conn) == 0
            raise RuntimeError("the caller's own write failed")
        assert recorder.allocate_call_index("s1") == 0

    def test_open_state_joins_the_callers_transaction(self, recorder: CallRecorder) -> None:
        with recorder.engine.connect() as conn:
            recorder.open_state("s1", connection=conn)
            conn.rollback()
        with pytest.raises(UnknownStateError):
            recorder.allocate_call_index("s1")


def test_postgresql_function_shares_the_allocator(postgresql_url: str) -> None:
    with CallRecorder(postgresql_url) as recorder:
        recorder.open_state("s1")
        assert recorder.allocate_call_index("s1") == 0
        with recorder.engine.begin() as conn:
            assert conn.execute(text("SELECT callindex_allocate_v2('s1')")).scalar_one() == 1
            assert conn.execute(text("SELECT callindex_allocate_v2('s1', 5)")).scalar_one() == 2
            assert (
                conn.execute(text("SELECT callindex_allocate_v2(state_id => 's1')")).scalar_one()
                == 7
            )
        assert recorder.allocate_call_index("s1") == 8


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("callindex_allocate_v2('nope')", "unknown state nope"),
        ("callindex_allocate_v2('s1', 0)", "count must be 1 to 1000000"),
        ("callindex_allocate_v2('s1', NULL)", "count must be 1 to 1000000"),
    ],
)
def test_postgresql_function_refuses_bad_input(
    postgresql_url: str, call: str, message: str
) -> None:
    with CallRecorder(postgresql_url) as recorder:
        recorder.open_state("s1")
        with pytest.raises(Exception, match=message), recorder.engine.begin() as conn:
            conn.execute(text(f"SELECT {call}"))
        assert counter_value(postgresql_url, "s1") == 0
