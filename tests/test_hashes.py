"""Hashes anyone can recompute: SHA-256 over the RFC 8785 form of each payload,
computed over exactly what is stored, checked by ``verify --hashes``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import rfc8785
from click.testing import CliRunner
from sqlalchemy import text

from callindex import AuditedHTTPClient, CallRecorder, migrations, payloads
from callindex.cli import cli
from callindex.database import Database
from callindex.errors import InvalidInputError, InvalidPayloadError

# Numbers jsonb would have rewritten, and text JCS escapes its own way.
AWKWARD = {
    "big": 1e300,
    "sixteen": 1e16,
    "negative_zero": -0.0,
    "thirty_digits": 1.2345678901234568e29,
    "tiny": 1e-7,
    "tenth": 0.1,
    "integral_float": 3.0,
    "safe_integer": 2**53 - 1,
    "text": 'é ☃ \u2028 \U0001f600 "quoted" \\ \t',
    "nested": [{"b": 1, "a": [True, False, None]}],
    "keys": {"\U0001f600": 1, "\ufb33": 2, "a": 3, "A": 4},
}


def jcs_sha256(value: Any) -> str:
    """What the upstream framework and any JCS implementation compute."""
    return hashlib.sha256(rfc8785.dumps(value)).hexdigest()


def stored(url: str, call_id: str) -> dict[str, Any]:
    """A call's payloads as the text the database holds, and its hashes."""
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT hash_scheme, CAST(request AS text) AS request, request_hash, "
                "CAST(response AS text) AS response, response_hash FROM calls "
                "WHERE call_id = :id"
            ),
            {"id": call_id},
        ).one()
    return dict(row._mapping)


@pytest.fixture
def opened(recorder: CallRecorder) -> CallRecorder:
    recorder.open_state("s1")
    return recorder


class TestHashesAreRFC8785:
    def test_the_hash_is_sha256_of_the_jcs_form(self, opened: CallRecorder) -> None:
        request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1}
        call = opened.record_call("s1", "llm", "success", request, response={"ok": True})
        assert call.request_hash == jcs_sha256(request)
        assert call.response_hash == jcs_sha256({"ok": True})
        assert call.hash_scheme == "rfc8785"
        assert opened.calls("s1")[0].hash_scheme == "rfc8785"

    def test_what_is_stored_hashes_to_what_is_recorded(
        self, opened: CallRecorder, db_url: str
    ) -> None:
        call = opened.record_call("s1", "http", "success", AWKWARD, response=[AWKWARD, -0.0, 1e300])
        row = stored(db_url, call.call_id)
        assert row["hash_scheme"] == "rfc8785"
        for name in ("request", "response"):
            assert hashlib.sha256(row[name].encode()).hexdigest() == row[f"{name}_hash"]
            # An auditor parsing the stored JSON as I-JSON gets the same form back.
            reparsed = payloads.parse_stored(row[name])
            assert rfc8785.dumps(reparsed).decode() == row[name]
        assert row["request_hash"] == jcs_sha256(AWKWARD)
        assert opened.verify(hashes=True).hash_mismatches == []

    def test_a_begun_then_finished_call_too(self, opened: CallRecorder, db_url: str) -> None:
        call = opened.begin_call("s1", "http", {"n": 1e16})
        opened.finish_call(call.call_id, "error", error={"type": "x", "at": -0.0, "e": 1e300})
        row = stored(db_url, call.call_id)
        assert row["request"] == '{"n":10000000000000000}'
        report = opened.verify(hashes=True)
        assert report.ok and report.hashes_checked == {"rfc8785": 2}

    @pytest.mark.parametrize(
        "value",
        [0.30000000000000004, 123456789.12345679, 1.2345678901234568e29, 1e300, 12, -0.0,
         "text", True, None, [1e300]],
    )  # fmt: skip
    def test_top_level_scalars_round_trip_on_both_backends(
        self, opened: CallRecorder, value: Any
    ) -> None:
        """SQLite's JSON column has numeric affinity: a number payload is stored
        as a number, and checked as one."""
        call = opened.record_call("s1", "http", "success", value, response=value)
        assert call.request_hash == jcs_sha256(value)
        assert opened.calls("s1")[0].request == value
        report = opened.verify(hashes=True)
        assert report.hash_mismatches == [], report.hash_mismatches

    def test_integers_beyond_the_double_range_are_refused_with_a_hint(
        self, opened: CallRecorder
    ) -> None:
        with pytest.raises(InvalidPayloadError, match=r"2\*\*53 - 1.*string"):
            opened.record_call("s1", "http", "success", {"id": 2**63 - 1})
        assert opened.calls("s1") == []

    def test_an_http_body_with_such_integers_is_kept_as_text_and_the_call_finished(
        self, opened: CallRecorder
    ) -> None:
        body = b'{"id": 1234567890123456789, "name": "tweet"}'
        transport = httpx.MockTransport(
            lambda r: httpx.Response(
                200, content=body, headers={"content-type": "application/json"}
            )
        )
        with AuditedHTTPClient(opened, "s1", inner=transport, retry=None) as client:
            assert client.get("https://api.test/x").json()["id"] == 1234567890123456789
        (call,) = opened.calls("s1")
        assert call.status == "success"
        assert call.response["body"]["text"] == body.decode()
        assert "2**53" in call.response["body"]["note"]


def tamper(url: str, call_id: str, response: str) -> None:
    """Change a finished call's stored response past the guards (as an attacker
    with the owner's rights could)."""
    with CallRecorder(url) as recorder, recorder.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(
                text("UPDATE calls SET response = CAST(:r AS json) WHERE call_id = :id"),
                {"r": response, "id": call_id},
            )
            return
        guard = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE name = 'callindex_guard_calls_update'")
        ).scalar_one()
        conn.execute(text("DROP TRIGGER callindex_guard_calls_update"))
        conn.execute(
            text("UPDATE calls SET response = :r WHERE call_id = :id"),
            {"r": response, "id": call_id},
        )
        conn.execute(text(guard))


class TestVerifyHashes:
    def test_a_changed_payload_is_reported_and_exits_1(
        self, opened: CallRecorder, db_url: str
    ) -> None:
        kept = opened.record_call("s1", "http", "success", {"q": 1}, response={"amount": 10})
        changed = opened.record_call("s1", "http", "success", {"q": 2}, response={"amount": 10})
        tamper(db_url, changed.call_id, '{"amount":1000}')

        result = CliRunner().invoke(cli, ["--db", db_url, "verify", "--hashes", "--json"])
        assert result.exit_code == 1, result.output
        report = json.loads(result.output)
        assert [(m["call_id"], m["payload"]) for m in report["hash_mismatches"]] == [
            (changed.call_id, "response")
        ]
        assert kept.call_id not in result.output.split("hash_mismatches")[1]

        plain = CliRunner().invoke(cli, ["--db", db_url, "verify", "--hashes"])
        assert plain.exit_code == 1 and "payload hashes that differ" in plain.output

    def test_an_edit_of_spacing_alone_is_reported(self, opened: CallRecorder, db_url: str) -> None:
        call = opened.record_call("s1", "http", "success", {"q": 1}, response={"amount": 10})
        tamper(db_url, call.call_id, '{"amount": 10}')
        report = opened.verify(hashes=True)
        assert [(m["call_id"], m["payload"]) for m in report.hash_mismatches] == [
            (call.call_id, "response")
        ]

    def test_a_sound_trail_passes(self, opened: CallRecorder, db_url: str) -> None:
        for n in range(3):
            opened.record_call("s1", "http", "success", {"n": n, "x": AWKWARD}, response={"ok": n})
        result = CliRunner().invoke(cli, ["--db", db_url, "verify", "--hashes"])
        assert result.exit_code == 0, result.output
        assert "6 rfc8785 checked" in result.output

    def test_many_calls_are_checked_in_batches(self, opened: CallRecorder) -> None:
        for n in range(1203):
            opened.record_call("s1", "http", "success", {"n": n})
        report = opened.verify(hashes=True)
        assert report.ok and report.hashes_checked == {"rfc8785": 1203}


@pytest.fixture
def at_0005(empty_db_url: str) -> Iterator[str]:
    """A database at revision 0005 (payloads in jsonb on PostgreSQL) holding
    calls recorded the way callindex 0.1 hashed them: sorted-key json.dumps."""
    db = Database(empty_db_url)
    migrations.upgrade(db, "0005")
    legacy = [("old-1", 0, {"b": 1, "a": "é"}), ("old-2", 1, {"list": [1, 2.5, None]})]
    cast = "CAST(:request AS jsonb)" if db.engine.dialect.name == "postgresql" else ":request"
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO call_index_counters (state_id, next_index) VALUES ('s', 3)"))
        for call_id, index, request in legacy:
            conn.execute(
                text(
                    "INSERT INTO calls (call_id, state_id, call_index, call_type, status, "
                    f"request, request_hash, created_at, completed_at) VALUES (:id, 's', :i, "
                    f"'http', 'success', {cast}, :hash, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {
                    "id": call_id,
                    "i": index,
                    "request": json.dumps(request),
                    "hash": hashlib.sha256(payloads.legacy_json(request).encode()).hexdigest(),
                },
            )
        # One whose recorded hash does not match what is stored.
        conn.execute(
            text(
                "INSERT INTO calls (call_id, state_id, call_index, call_type, status, request, "
                "request_hash, created_at, completed_at) VALUES ('old-3', 's', 2, 'http', "
                f"'success', {cast.replace(':request', ':r')}, :h, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"r": '{"a": 1}', "h": "0" * 64},
        )
    migrations.upgrade(db)
    yield empty_db_url


class TestRowsRecordedBeforeRFC8785:
    def test_keep_their_hashes_and_are_checked_by_their_own_scheme(self, at_0005: str) -> None:
        with CallRecorder(at_0005) as recorder:
            old = recorder.calls("s")
            assert [c.hash_scheme for c in old] == ["sorted-json"] * 3
            recorder.record_call("s", "http", "success", {"new": 1e300})
            report = recorder.verify(hashes=True)
        assert report.hashes_checked == {"sorted-json": 3, "rfc8785": 1}
        # Reported apart: jsonb may have rewritten the numbers of such rows.
        assert report.hash_mismatches == [] and report.ok
        assert [(m["call_id"], m["hash_scheme"]) for m in report.legacy_hash_mismatches] == [
            ("old-3", "sorted-json")
        ]

    def test_the_scheme_of_a_recorded_call_cannot_change(self, at_0005: str) -> None:
        with CallRecorder(at_0005) as recorder, recorder.engine.begin() as conn:
            refused = conn.begin_nested()
            with pytest.raises(Exception, match="callindex"):
                conn.execute(
                    text("UPDATE calls SET hash_scheme = 'rfc8785' WHERE call_id = 'old-1'")
                )
            refused.rollback()


class TestLookingCallsUpByRequestHash:
    def test_finds_the_calls_of_every_state_in_order(self, recorder: CallRecorder) -> None:
        for state_id in ("run-1/b", "run-1/a"):
            recorder.open_state(state_id)
        request = {"url": "https://api.test/x", "n": 1e16}
        first = recorder.record_call("run-1/b", "http", "success", request)
        recorder.record_call("run-1/a", "http", "success", {"other": True})
        second = recorder.record_call("run-1/a", "llm", "success", request)
        third = recorder.record_call("run-1/a", "http", "error", request)

        found = recorder.calls_with_request_hash(jcs_sha256(request))
        assert [c.call_id for c in found] == [second.call_id, third.call_id, first.call_id]
        only_http = recorder.calls_with_request_hash(jcs_sha256(request), call_type="http")
        assert [c.call_id for c in only_http] == [third.call_id, first.call_id]
        assert recorder.calls_with_request_hash(jcs_sha256({"never": 1})) == []

    @pytest.mark.parametrize("bad", ["", "ABC", "0" * 63, "g" * 64, None])
    def test_a_malformed_hash_is_refused(self, recorder: CallRecorder, bad: Any) -> None:
        with pytest.raises(InvalidInputError):
            recorder.calls_with_request_hash(bad)
