"""Bad input: a typed error (rooted in CallIndexError), and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import make_url

from callindex import (
    CallIndexError,
    CallRecorder,
    ConfigurationError,
    DatabaseRetryPolicy,
    DatabaseUnavailableError,
    InvalidCallError,
    InvalidCountError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidStateIdError,
    PayloadTooLargeError,
    SchemaMissingError,
)
from callindex.allocator import MAX_COUNT
from callindex.payloads import MAX_PAYLOAD_BYTES
from callindex.schema import MAX_STATE_ID_LENGTH

from conftest import call_rows, counter_count, counter_value

BAD_STATE_IDS = [
    pytest.param("", id="empty"),
    pytest.param(None, id="none"),
    pytest.param(42, id="int"),
    pytest.param(b"s1", id="bytes"),
    pytest.param("x" * (MAX_STATE_ID_LENGTH + 1), id="too-long"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\ud800b", id="lone-surrogate"),
]
BAD_COUNTS = [
    pytest.param(0, id="zero"),
    pytest.param(-1, id="negative"),
    pytest.param(MAX_COUNT + 1, id="absurdly-large"),
    pytest.param(2**63, id="beyond-bigint"),
    pytest.param(1.0, id="float"),
    pytest.param("3", id="string"),
    pytest.param(True, id="bool"),
    pytest.param(None, id="none"),
]


@pytest.mark.parametrize("state_id", BAD_STATE_IDS)
def test_open_state_refuses_a_bad_state_id(
    recorder: CallRecorder, db_url: str, state_id: object
) -> None:
    with pytest.raises(InvalidStateIdError):
        recorder.open_state(state_id)  # type: ignore[arg-type]
    assert counter_count(db_url) == 0


@pytest.mark.parametrize("state_id", BAD_STATE_IDS)
def test_allocate_refuses_a_bad_state_id(recorder: CallRecorder, state_id: object) -> None:
    with pytest.raises(InvalidStateIdError) as raised:
        recorder.allocate_call_index(state_id)  # type: ignore[arg-type]
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("count", BAD_COUNTS)
def test_allocate_refuses_a_bad_count(recorder: CallRecorder, db_url: str, count: object) -> None:
    recorder.open_state("s1")
    with pytest.raises(InvalidCountError):
        recorder.allocate_call_index("s1", count)  # type: ignore[arg-type]
    assert counter_value(db_url, "s1") == 0


def test_the_longest_allowed_state_id_works(recorder: CallRecorder) -> None:
    state_id = "é" * MAX_STATE_ID_LENGTH
    recorder.open_state(state_id)
    assert recorder.allocate_call_index(state_id) == 0


def test_a_database_without_the_schema_says_to_upgrade(empty_db_url: str) -> None:
    with CallRecorder(empty_db_url) as recorder:
        for attempt in (
            lambda: recorder.open_state("s1"),
            lambda: recorder.allocate_call_index("s1"),
        ):
            with pytest.raises(SchemaMissingError, match="callindex db upgrade"):
                attempt()


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with CallRecorder(f"sqlite:///{path}") as recorder, pytest.raises(SchemaMissingError):
        recorder.open_state("s1")
    assert not path.exists()


def test_an_unreachable_server_raises_database_unavailable_without_the_password() -> None:
    url = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/nowhere?connect_timeout=2"
    with CallRecorder(url) as recorder, pytest.raises(DatabaseUnavailableError) as raised:
        recorder.allocate_call_index("s1")
    assert "hunter2-secret" not in str(raised.value)
    assert "hunter2-secret" not in repr(recorder)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "not a database URL"),
        ("mysql://u:hunter2-secret@localhost/db", "unsupported database 'mysql'"),
        ("postgresql+asyncpg://localhost/db", "unsupported PostgreSQL driver"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///x.db?timeout=abc", "timeout must be seconds"),
        ("postgresql://u:hunter2-secret@h:abc/db", "not a database URL"),
        ("postgresql:/u:hunter2-secret@h/db", "not a database URL"),
    ],
)
def test_a_bad_url_raises_configuration_error(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        CallRecorder(url)
    assert "hunter2-secret" not in str(raised.value)


def test_every_error_shares_one_base_class() -> None:
    import callindex.errors as errors

    types = [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    ]
    assert len(types) > 5
    assert all(issubclass(t, CallIndexError) for t in types)


class _Opaque:
    pass


BAD_PAYLOADS = [
    pytest.param({"a": {1, 2}}, InvalidPayloadError, id="set"),
    pytest.param({"a": b"bytes"}, InvalidPayloadError, id="bytes"),
    pytest.param({"a": _Opaque()}, InvalidPayloadError, id="object"),
    pytest.param({"a": float("nan")}, InvalidPayloadError, id="nan"),
    pytest.param({"a": float("inf")}, InvalidPayloadError, id="infinity"),
    pytest.param({1: "x", "b": "y"}, InvalidPayloadError, id="mixed-keys"),
    pytest.param({"a": "nul\x00byte"}, InvalidPayloadError, id="nul-in-value"),
    pytest.param({"nul\x00key": 1}, InvalidPayloadError, id="nul-in-key"),
    pytest.param(["a\ud800b"], InvalidPayloadError, id="lone-surrogate"),
    pytest.param({"a": "x" * MAX_PAYLOAD_BYTES}, PayloadTooLargeError, id="oversized"),
]


@pytest.mark.parametrize("field", ["request", "response", "error"])
@pytest.mark.parametrize(("payload", "error_type"), BAD_PAYLOADS)
def test_record_call_refuses_a_bad_payload(
    recorder: CallRecorder, db_url: str, field: str, payload: object, error_type: type
) -> None:
    recorder.open_state("s1")
    arguments = {"request": {}, field: payload}
    with pytest.raises(error_type, match=field):
        recorder.record_call("s1", "http", "success", **arguments)
    assert call_rows(db_url) == []
    assert counter_value(db_url, "s1") == 0


@pytest.mark.parametrize(("payload", "error_type"), BAD_PAYLOADS[:3] + BAD_PAYLOADS[-2:])
def test_two_phase_calls_refuse_a_bad_payload(
    recorder: CallRecorder, db_url: str, payload: object, error_type: type
) -> None:
    recorder.open_state("s1")
    with pytest.raises(error_type):
        recorder.begin_call("s1", "http", payload)
    begun = recorder.begin_call("s1", "http", {})
    with pytest.raises(error_type):
        recorder.finish_call(begun.call_id, "success", response=payload)
    assert call_rows(db_url) == [(begun.call_id, "s1", 0, "pending")]


def test_a_payload_just_under_the_limit_is_recorded(recorder: CallRecorder) -> None:
    recorder.open_state("s1")
    payload = "x" * (MAX_PAYLOAD_BYTES - 2)  # plus the two quotes of the JSON string
    assert recorder.record_call("s1", "http", "success", payload).request == payload


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"call_type": "FTP"}, id="upper-case-call-type"),
        pytest.param({"call_type": "http-redirect"}, id="hyphen-in-call-type"),
        pytest.param({"call_type": "x" * 33}, id="long-call-type"),
        pytest.param({"call_type": ""}, id="empty-call-type"),
        pytest.param({"call_type": "sql\n"}, id="newline-in-call-type"),
        pytest.param({"call_type": None}, id="no-call-type"),
        pytest.param({"status": "pending"}, id="pending-status"),
        pytest.param({"status": "abandoned"}, id="abandoned-status"),
        pytest.param({"status": "ok"}, id="unknown-status"),
        pytest.param({"latency_ms": -1}, id="negative-latency"),
        pytest.param({"latency_ms": float("nan")}, id="nan-latency"),
        pytest.param({"latency_ms": "12"}, id="string-latency"),
        pytest.param({"call_id": ""}, id="empty-call-id"),
        pytest.param({"call_id": "x" * 129}, id="long-call-id"),
        pytest.param({"call_id": "new\nline"}, id="unprintable-call-id"),
        pytest.param({"call_id": 7}, id="int-call-id"),
    ],
)
def test_record_call_refuses_bad_fields(
    recorder: CallRecorder, db_url: str, arguments: dict[str, object]
) -> None:
    recorder.open_state("s1")
    call = {"state_id": "s1", "call_type": "http", "status": "success", "request": {}}
    with pytest.raises(InvalidCallError):
        recorder.record_call(**{**call, **arguments})  # type: ignore[arg-type]
    assert call_rows(db_url) == []
    assert counter_value(db_url, "s1") == 0


@pytest.mark.parametrize("status", ["pending", "abandoned", "done", None])
def test_finish_call_refuses_a_status_that_is_not_final(
    recorder: CallRecorder, db_url: str, status: object
) -> None:
    recorder.open_state("s1")
    begun = recorder.begin_call("s1", "http", {})
    with pytest.raises(InvalidCallError):
        recorder.finish_call(begun.call_id, status)  # type: ignore[arg-type]
    assert call_rows(db_url) == [(begun.call_id, "s1", 0, "pending")]


def test_a_password_in_the_query_string_never_shows() -> None:
    url = "postgresql+psycopg://someone@127.0.0.1:1/x?password=hunter2-secret&connect_timeout=2"
    policy = DatabaseRetryPolicy(max_attempts=1)
    with (
        CallRecorder(url, retry=policy) as recorder,
        pytest.raises(DatabaseUnavailableError) as raised,
    ):
        recorder.allocate_call_index("s1")
    assert "hunter2-secret" not in str(raised.value) and "hunter2-secret" not in repr(recorder)


def test_a_refused_login_is_not_retried(
    postgresql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url(postgresql_url).set(username="no_such_role_here").render_as_string(False)
    with CallRecorder(url) as recorder, pytest.raises(ConfigurationError, match="does not exist"):
        recorder.allocate_call_index("s1")
    assert not [r for r in caplog.records if r.name == "callindex.retry"]


@pytest.mark.parametrize("seconds", ["10", float("nan"), float("inf"), -1, None, True])
def test_sweep_and_verify_refuse_a_bad_age(recorder: CallRecorder, seconds: object) -> None:
    with pytest.raises(InvalidInputError):
        recorder.sweep(seconds)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        recorder.verify(seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "arguments",
    [{"max_attempts": "3"}, {"max_attempts": 0}, {"max_seconds": "1"}, {"initial_wait": -1}],
)
def test_a_nonsensical_database_retry_policy_is_refused(arguments: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        DatabaseRetryPolicy(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("counts", [None, [("s1", 1)], {"s1": 0}, {"": 1}])
def test_allocate_call_indices_refuses_bad_counts(
    recorder: CallRecorder, db_url: str, counts: object
) -> None:
    recorder.open_state("s1")
    with pytest.raises(InvalidInputError):
        recorder.allocate_call_indices(counts)  # type: ignore[arg-type]
    assert counter_value(db_url, "s1") == 0
