"""Audited HTTP and LLM clients: every request and every retry attempt is a
recorded call with its own database-allocated index."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import hishel
import hishel.httpx as hishel_httpx
import httpx
import pytest
import respx
from sqlalchemy import text

from callindex import (
    AsyncAuditedHTTPClient,
    AsyncAuditedLLMClient,
    AuditedHTTPClient,
    AuditedLLMClient,
    AuditedTransport,
    CallRecorder,
    Redactor,
    RetryPolicy,
)
from callindex.clients.bodies import BodyTap
from callindex.loopback import LoopbackAPI, Reply

from conftest import assert_trail_sound, call_rows
from workers import call_with_both_clients, request_and_hang, run_workers, spawn_until_held

FAST = RetryPolicy(initial_wait=0.01, max_wait=0.05)


@pytest.fixture
def api() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as server:
        yield server


@pytest.fixture
def opened(recorder: CallRecorder) -> CallRecorder:
    recorder.open_state("s1")
    return recorder


def acknowledged(recorder: CallRecorder, state_id: str) -> dict[str, tuple[str, int]]:
    return {c.call_id: (state_id, c.call_index) for c in recorder.calls(state_id)}


def test_an_http_client_and_an_llm_client_share_one_state(
    opened: CallRecorder, api: LoopbackAPI, db_url: str
) -> None:
    """The original bug: both clients used index 0 and one call was lost."""
    with (
        AuditedHTTPClient(opened, "s1", base_url=api.url) as http,
        AuditedLLMClient(opened, "s1", base_url=f"{api.url}/v1", model="m") as llm,
    ):
        for n in range(3):
            assert http.get(f"/items/{n}").json() == {"id": str(n), "name": f"item-{n}"}
            assert llm.chat([{"role": "user", "content": f"hi {n}"}]).text == f"echo: hi {n}"
    recorded = opened.calls("s1")
    assert [c.call_index for c in recorded] == list(range(6))
    assert [c.call_type for c in recorded] == ["http", "llm"] * 3
    assert all(c.status == "success" for c in recorded)
    assert_trail_sound(db_url, acknowledged(opened, "s1"))


@pytest.mark.slow
def test_four_processes_with_both_clients_on_one_state(db_url: str, api: LoopbackAPI) -> None:
    with CallRecorder(db_url) as recorder:
        recorder.open_state("shared")
        run_workers(call_with_both_clients, [(db_url, api.url, "shared", 50)] * 4)
        recorded = recorder.calls("shared")
        assert [c.call_index for c in recorded] == list(range(400))
        assert sorted(c.call_type for c in recorded) == ["http"] * 200 + ["llm"] * 200
        operations = {c.request["operation_id"] for c in recorded}
        assert len(operations) == 400  # every call recorded exactly once
        assert_trail_sound(db_url, acknowledged(recorder, "shared"))
    assert api.stats["requests"] == 400


class TestRetries:
    def test_429_429_200_is_three_rows_honouring_retry_after(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        api.plan(Reply.too_many_requests("1"), Reply.too_many_requests("1"))
        started = time.monotonic()
        with AuditedHTTPClient(opened, "s1", base_url=api.url, retry=FAST) as http:
            response = http.get("/items/1")
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert elapsed >= 2.0  # two waits of Retry-After: 1, not FAST's 50 ms backoff
        recorded = opened.calls("s1")
        assert [c.call_index for c in recorded] == [0, 1, 2]
        assert [c.request["attempt"] for c in recorded] == [1, 2, 3]
        assert [c.status for c in recorded] == ["error", "error", "success"]
        assert [c.response["status_code"] for c in recorded] == [429, 429, 200]
        assert recorded[0].response["body"]["json"] == {"error": {"message": "rate limited"}}
        assert [c.error for c in recorded] == [
            {"type": "http_status", "status_code": 429, "reason": "Too Many Requests"},
            {"type": "http_status", "status_code": 429, "reason": "Too Many Requests"},
            None,
        ]
        assert len({c.request["operation_id"] for c in recorded}) == 1

    def test_retry_after_ms_and_5xx_and_dropped_connections(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        api.plan(Reply(429, {"retry-after-ms": "150"}), Reply(503), Reply(drop=True), Reply(500))
        started = time.monotonic()
        policy = RetryPolicy(max_attempts=5, initial_wait=0.01, max_wait=0.05)
        with AuditedHTTPClient(opened, "s1", base_url=api.url, retry=policy) as http:
            assert http.get("/items/1").status_code == 200
        assert time.monotonic() - started >= 0.15
        recorded = opened.calls("s1")
        assert [c.status for c in recorded] == ["error"] * 4 + ["success"]
        assert recorded[2].error["type"] == "RemoteProtocolError"
        assert recorded[2].response is None

    def test_each_retry_logs_one_concise_line(
        self, opened: CallRecorder, api: LoopbackAPI, caplog: pytest.LogCaptureFixture
    ) -> None:
        api.plan(Reply(503), Reply(429, {"retry-after-ms": "100"}))
        policy = RetryPolicy(max_attempts=4, initial_wait=0.01, max_wait=0.02)
        with (
            caplog.at_level(logging.DEBUG, logger="callindex.http"),
            AuditedHTTPClient(opened, "s1", base_url=api.url, retry=policy) as http,
        ):
            assert http.get("/items/1").status_code == 200
        lines = [r.getMessage() for r in caplog.records if r.name == "callindex.http"]
        retries = [line for line in lines if line.startswith("retrying")]
        assert len(retries) == 2, lines
        assert re.fullmatch(r"retrying in 0\.0 s \(2/4\): HTTP 503", retries[0])
        assert re.fullmatch(r"retrying in 0\.1 s \(3/4\): HTTP 429", retries[1])

    def test_attempts_are_bounded_and_the_last_response_returned(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        api.plan(*[Reply(503)] * 5)
        policy = RetryPolicy(max_attempts=3, initial_wait=0.01, max_wait=0.02)
        with AuditedHTTPClient(opened, "s1", base_url=api.url, retry=policy) as http:
            assert http.get("/items/1").status_code == 503
        assert [c.request["attempt"] for c in opened.calls("s1")] == [1, 2, 3]

    def test_post_is_not_retried_unless_the_caller_says_it_is_safe(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        with AuditedHTTPClient(opened, "s1", base_url=api.url, retry=FAST) as http:
            api.plan(Reply(503))
            assert http.post("/echo", json={"a": 1}).status_code == 503
            assert len(opened.calls("s1")) == 1
            api.plan(Reply(503))
            safe = http.post("/echo", json={"a": 1}, extensions={"callindex.retry_safe": True})
            assert safe.status_code == 200
        assert [c.request["attempt"] for c in opened.calls("s1")] == [1, 1, 2]

    def test_llm_completions_are_retried(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(Reply.too_many_requests("0"), Reply(502))
        with AuditedLLMClient(opened, "s1", base_url=f"{api.url}/v1", model="m", retry=FAST) as llm:
            assert llm.chat([{"role": "user", "content": "x"}]).text == "echo: x"
        assert [c.request["attempt"] for c in opened.calls("s1")] == [1, 2, 3]

    def test_a_retried_database_write_inside_an_attempt_adds_no_row(
        self, db_url: str, api: LoopbackAPI
    ) -> None:
        with CallRecorder(db_url) as recorder:
            recorder.open_state("s1")
            real_finish = recorder.finish_call
            failures = iter([True])

            def finish_with_lost_ack(*args: Any, **kwargs: Any) -> Any:
                done = real_finish(*args, **kwargs)
                if next(failures, False):  # committed, but the caller never heard back
                    return real_finish(*args, **kwargs)
                return done

            recorder.finish_call = finish_with_lost_ack  # type: ignore[method-assign]
            with AuditedHTTPClient(recorder, "s1", base_url=api.url) as http:
                http.get("/items/1")
            assert [(c.call_index, c.status) for c in recorder.calls("s1")] == [(0, "success")]


class TestFailuresAreRecorded:
    def test_connect_errors(self, opened: CallRecorder) -> None:
        policy = RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.02)
        with (
            AuditedHTTPClient(opened, "s1", base_url="http://127.0.0.1:1", retry=policy) as http,
            pytest.raises(httpx.ConnectError),
        ):
            http.get("/items/1")
        recorded = opened.calls("s1")
        assert [(c.status, c.error["type"]) for c in recorded] == [("error", "ConnectError")] * 2

    def test_timeouts(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(Reply(delay=1.0, status=0))
        with (
            AuditedHTTPClient(opened, "s1", base_url=api.url, timeout=0.2, retry=None) as http,
            pytest.raises(httpx.ReadTimeout),
        ):
            http.get("/items/1")
        [call] = opened.calls("s1")
        assert (call.status, call.error["type"]) == ("error", "ReadTimeout")
        assert call.latency_ms is not None and call.latency_ms >= 200

    @pytest.mark.slow
    def test_a_worker_killed_mid_request_leaves_a_pending_row(
        self, opened: CallRecorder, db_url: str, api: LoopbackAPI
    ) -> None:
        api.plan(Reply(delay=30, status=0))
        process, _ = spawn_until_held(request_and_hang, db_url, api.url, "s1")
        deadline = time.monotonic() + 30
        while not opened.calls("s1") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        [call] = opened.calls("s1")
        assert (call.status, call.request["url"]) == ("pending", f"{api.url}/items/slow")
        assert [s["call_id"] for s in opened.sweep(0)] == [call.call_id]


def test_the_openai_sdk_through_audited_transport_over_httpx2(
    opened: CallRecorder, api: LoopbackAPI, db_url: str
) -> None:
    import httpx2  # the `sdk` extra, which the test extra includes: a missing one fails
    import openai

    api.plan(Reply.too_many_requests("0"), Reply(500, body={"error": {"message": "boom"}}))
    transport = AuditedTransport(opened, "s1", inner=httpx2.HTTPTransport())
    client = openai.OpenAI(
        base_url=f"{api.url}/v1",
        api_key="sk-planted-sdk-secret",
        max_retries=3,
        http_client=httpx2.Client(transport=transport),
    )
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello sdk"}]
    )
    assert completion.choices[0].message.content == "echo: hello sdk"
    recorded = opened.calls("s1")
    # The SDK's own retries are separate recorded calls with consecutive indices.
    assert [(c.call_index, c.response["status_code"]) for c in recorded] == [
        (0, 429), (1, 500), (2, 200)
    ]  # fmt: skip
    assert [c.request["headers"]["x-stainless-retry-count"] for c in recorded] == ["0", "1", "2"]
    assert recorded[2].response["body"]["json"]["choices"][0]["message"]["content"] == (
        "echo: hello sdk"
    )
    assert "sk-planted-sdk-secret" not in _everything_stored(db_url)


def _everything_stored(url: str) -> str:
    with CallRecorder(url) as recorder, recorder.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM calls")).all()
        counters = conn.execute(text("SELECT * FROM call_index_counters")).all()
    return json.dumps([list(map(str, row)) for row in [*rows, *counters]], ensure_ascii=False)


SECRETS = {
    "authorization": "Bearer planted-bearer-0001",
    "proxy-authorization": "Basic planted-proxy-0002",
    "cookie": "session=planted-cookie-0003",
    "x-api-key": "planted-xapikey-0004",
    "api-key": "planted-apikey-0005",
    "x-custom-token": "planted-token-0006",
    "x-client-secret": "planted-secret-0007",
    "x-auth-thing": "planted-auth-0008",
}
QUERY_SECRETS = {"api_key": "planted-query-0009", "token": "planted-query-0010",
                 "key": "planted-query-0011"}  # fmt: skip
USERINFO = ("planted-user-0012", "planted-pass-0013")


class TestSecretsNeverReachTheDatabase:
    def _plant(self, recorder: CallRecorder, api: LoopbackAPI, redactor: Redactor) -> None:
        host = api.url.removeprefix("http://")
        query = "&".join(f"{k}={v}" for k, v in QUERY_SECRETS.items())
        url = f"http://{USERINFO[0]}:{USERINFO[1]}@{host}/items/1?{query}&page=2"
        api.plan(Reply(headers={"Set-Cookie": "sid=planted-setcookie-0014"}, body={"id": "1"}))
        with AuditedHTTPClient(recorder, "s1", headers=SECRETS, redactor=redactor) as http:
            assert http.get(url).status_code == 200
        broken = f"http://{USERINFO[0]}:{USERINFO[1]}@127.0.0.1:1/?token=planted-query-0015"
        with (
            AuditedHTTPClient(recorder, "s1", headers=SECRETS, redactor=redactor, retry=None) as h,
            pytest.raises(httpx.ConnectError),
        ):
            h.get(broken)
        with AuditedLLMClient(
            recorder, "s1", base_url=f"{api.url}/v1", model="m",
            api_key="sk-planted-llm-0016", redactor=redactor,
        ) as llm:  # fmt: skip
            llm.chat([{"role": "user", "content": "hi"}])

    def _planted(self) -> list[str]:
        values = [v.split(" ")[-1].split("=")[-1] for v in SECRETS.values()]
        return [*values, *QUERY_SECRETS.values(), *USERINFO, "planted-setcookie-0014",
                "planted-query-0015", "sk-planted-llm-0016"]  # fmt: skip

    def test_without_a_key_secrets_are_dropped(
        self, opened: CallRecorder, api: LoopbackAPI, db_url: str
    ) -> None:
        self._plant(opened, api, Redactor(key=None))
        stored = _everything_stored(db_url)
        assert [s for s in self._planted() if s in stored] == []
        first = opened.calls("s1")[0]
        assert first.request["headers"]["authorization"] == "[redacted]"
        assert "page=2" in first.request["url"] and "[redacted]" in first.request["url"]
        assert first.response["headers"]["set-cookie"] == "[redacted]"

    def test_with_a_key_secrets_become_stable_fingerprints(
        self, opened: CallRecorder, api: LoopbackAPI, db_url: str
    ) -> None:
        redactor = Redactor(key=b"deployment-secret")
        self._plant(opened, api, redactor)
        stored = _everything_stored(db_url)
        assert [s for s in self._planted() if s in stored] == []
        assert "deployment-secret" not in stored
        first, second = opened.calls("s1")[:2]
        fingerprint = first.request["headers"]["x-api-key"]
        assert fingerprint == redactor.fingerprint("planted-xapikey-0004")
        assert fingerprint.startswith("hmac-sha256:") and len(fingerprint) == 12 + 64
        assert second.request["headers"]["x-api-key"] == fingerprint


class TestBodies:
    def test_json_text_binary_and_truncated(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        with AuditedHTTPClient(opened, "s1", base_url=api.url) as http:
            http.post("/echo", json={"k": [1, 2]}, extensions={"callindex.retry_safe": True})
            http.post("/echo", content=b"plain words", headers={"content-type": "text/plain"})
            binary = http.get("/binary").content
            big = http.get("/stream?chunks=300&size=1000").content
        echo, text_post, binary_call, big_call = opened.calls("s1")
        assert echo.request["body"]["json"] == {"k": [1, 2]}
        assert echo.response["body"]["json"] == {"received": {"k": [1, 2]}}
        assert text_post.request["body"]["text"] == "plain words"
        body = binary_call.response["body"]
        assert body["content_type"] == "application/octet-stream" and len(binary) == 1024
        assert body["length"] == 1024 and "base64" in body
        big_body = big_call.response["body"]
        assert big_body["truncated"] is True and big_body["length"] == len(big) == 300_000
        import hashlib

        assert big_body["sha256"] == hashlib.sha256(big).hexdigest()
        assert len(big_body["text"]) == 256 * 1024

    def test_a_stream_is_recorded_when_closed_and_marked_incomplete_if_left_early(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        with AuditedHTTPClient(opened, "s1", base_url=api.url) as http:
            with http.stream("GET", "/stream?chunks=4&size=5&delay=0.05") as streamed:
                assert opened.calls("s1")[0].status == "pending"  # in flight while streaming
                chunks = list(streamed.iter_bytes())
            with http.stream("GET", "/stream?chunks=50&size=5&delay=0.02") as early:
                next(early.iter_raw())
        assert b"".join(chunks) == b"00000111112222233333"
        full, partial = opened.calls("s1")
        assert (full.status, full.response["body"]["text"]) == ("success", "00000111112222233333")
        assert "incomplete" not in full.response["body"]
        assert partial.response["body"]["incomplete"] is True
        assert partial.response["body"]["length"] < 250


def test_async_clients_make_100_concurrent_calls_that_overlap(
    opened: CallRecorder, db_url: str
) -> None:
    async def scenario(api: LoopbackAPI) -> tuple[float, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        started = time.perf_counter()
        async with (
            AsyncAuditedHTTPClient(opened, "s1", base_url=api.url) as http,
            AsyncAuditedLLMClient(opened, "s1", base_url=f"{api.url}/v1", model="m") as llm,
        ):
            calls = [http.get(f"/items/{n}") for n in range(50)]
            chats = [llm.chat([{"role": "user", "content": f"n{n}"}]) for n in range(50)]
            results = await asyncio.gather(*calls, *chats)
        elapsed = time.perf_counter() - started
        stop.set()
        await beat
        assert len(results) == 100
        return elapsed, max(gaps)

    with LoopbackAPI(latency=0.2) as api:
        elapsed, worst_gap = asyncio.run(scenario(api))
        peak = api.peak_in_flight
    # One at a time, 100 calls of 200 ms would take 20 s.
    assert peak >= 10, f"only {peak} requests were ever in flight together"
    assert elapsed < 10
    assert worst_gap < 1.0, f"the event loop stalled for {worst_gap:.2f}s"
    recorded = opened.calls("s1")
    assert [c.call_index for c in recorded] == list(range(100))
    assert all(c.status == "success" for c in recorded)
    assert_trail_sound(db_url, acknowledged(opened, "s1"))
    assert len(call_rows(db_url)) == 100


class TestBodiesTheTrailCannotStoreAsJSON:
    """A body Python's json parses but the trail cannot store as JSON is kept
    as text, with a note of why; the caller gets its response and the call is
    finished."""

    @pytest.mark.parametrize(
        ("body", "why"),
        [
            (b'{"a": NaN}', "NaN is not a number JSON can store"),
            (b"[Infinity, -Infinity]", "Infinity is not a number JSON can store"),
            (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to parse"),
            (b"[" * 70 + b"]" * 70, "nested deeper than 64 levels"),
            (b'{"a": "\\u0000"}', "contains a NUL character"),
        ],
    )
    def test_kept_as_text_with_a_note(self, body: bytes, why: str) -> None:
        record = BodyTap(body).record("application/json")
        assert record is not None
        assert "json" not in record
        assert record["text"] == body.decode()[: len(record["text"])]
        assert why in record["note"]

    def test_a_nan_response_is_recorded_and_returned(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        api.plan(Reply(200, body={"score": float("nan"), "ok": True}))
        with AuditedHTTPClient(opened, "s1", base_url=api.url, retry=None) as http:
            response = http.get("/items/1")
        assert response.status_code == 200
        assert response.text == '{"score": NaN, "ok": true}'
        (call,) = opened.calls("s1")
        assert call.status == "success"
        assert call.response["body"]["text"] == '{"score": NaN, "ok": true}'
        assert "NaN" in call.response["body"]["note"]


class TestResponsesTheInnerTransportReadAlready:
    """A mock or caching inner transport hands back a response whose body is
    read already: the call is finished with that body all the same."""

    @staticmethod
    def mock(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/missing":
            return httpx.Response(404, json={"error": "no such item"})
        return httpx.Response(200, json={"id": 7, "items": [1, 2]})

    def test_sync(self, opened: CallRecorder) -> None:
        inner = httpx.MockTransport(self.mock)
        with AuditedHTTPClient(opened, "s1", base_url="http://api.test", inner=inner) as http:
            assert http.get("/items/7").json() == {"id": 7, "items": [1, 2]}
            assert http.get("/missing").status_code == 404
        found, missing = opened.calls("s1")
        assert (found.status, found.response["body"]["json"]) == (
            "success",
            {"id": 7, "items": [1, 2]},
        )
        assert (missing.status, missing.error["status_code"]) == ("error", 404)
        assert missing.response["body"]["json"] == {"error": "no such item"}

    def test_async(self, opened: CallRecorder) -> None:
        async def main() -> Any:
            inner = httpx.MockTransport(self.mock)
            async with AsyncAuditedHTTPClient(
                opened, "s1", base_url="http://api.test", inner=inner
            ) as http:
                return (await http.get("/items/7")).json()

        assert asyncio.run(main()) == {"id": 7, "items": [1, 2]}
        (call,) = opened.calls("s1")
        assert (call.status, call.response["body"]["json"]) == (
            "success",
            {"id": 7, "items": [1, 2]},
        )

    def test_respx(self, opened: CallRecorder) -> None:
        router = respx.Router(base_url="http://api.test", assert_all_called=True)
        router.get("/items/7").respond(json={"id": 7})
        inner = respx.transports.MockTransport(router=router)
        with AuditedHTTPClient(opened, "s1", base_url="http://api.test", inner=inner) as http:
            assert http.get("/items/7").json() == {"id": 7}
        with respx.mock(base_url="http://api.test") as patched:  # respx patching httpx itself
            patched.get("/items/8").respond(json={"id": 8})
            with AuditedHTTPClient(opened, "s1", base_url="http://api.test") as http:
                assert http.get("/items/8").json() == {"id": 8}
        calls = opened.calls("s1")
        assert [(c.status, c.response["body"]["json"]) for c in calls] == [
            ("success", {"id": 7}),
            ("success", {"id": 8}),
        ]

    def test_hishel_cache(self, opened: CallRecorder, tmp_path: Any) -> None:
        served = []

        def origin(request: httpx.Request) -> httpx.Response:
            served.append(request.url.path)
            return httpx.Response(
                200, json={"id": 7}, headers={"Cache-Control": "public, max-age=60"}
            )

        storage = hishel.SqliteStorage(database_path=tmp_path / "cache.db")
        inner = hishel_httpx.CacheTransport(httpx.MockTransport(origin), storage=storage)
        with AuditedHTTPClient(opened, "s1", base_url="http://api.test", inner=inner) as http:
            assert [http.get("/items/7").json() for _ in range(2)] == [{"id": 7}] * 2
        assert served == ["/items/7"]  # the second came from the cache
        calls = opened.calls("s1")
        assert [(c.status, c.response["body"]["json"]) for c in calls] == [
            ("success", {"id": 7})
        ] * 2


class TestCancelledCallsAreFinished:
    """A call cancelled while its worker lives is finished as ``error``
    ``{"type": "cancelled"}`` before the cancellation reaches the caller."""

    def test_asyncio_wait_for(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(Reply(200, body={"late": True}, delay=2.0))

        async def main() -> None:
            async with AsyncAuditedHTTPClient(opened, "s1", base_url=api.url, retry=None) as http:
                await asyncio.wait_for(http.get("/items/1"), 0.3)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(main())
        (call,) = opened.calls("s1")
        assert (call.status, call.error) == (
            "error",
            {"type": "cancelled", "message": "CancelledError"},
        )

    def test_task_cancellation(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(Reply(200, body={"late": True}, delay=2.0))

        async def main() -> None:
            async with AsyncAuditedHTTPClient(opened, "s1", base_url=api.url, retry=None) as http:
                task = asyncio.create_task(http.get("/items/1"))
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(main())
        (call,) = opened.calls("s1")
        assert (call.status, call.error["type"]) == ("error", "cancelled")

    def test_keyboard_interrupt_inside_the_transport(self, opened: CallRecorder) -> None:
        def interrupted(request: httpx.Request) -> httpx.Response:
            raise KeyboardInterrupt

        inner = httpx.MockTransport(interrupted)
        with (
            AuditedHTTPClient(opened, "s1", base_url="http://api.test", inner=inner) as http,
            pytest.raises(KeyboardInterrupt),
        ):
            http.get("/items/1")
        (call,) = opened.calls("s1")
        assert (call.status, call.error) == (
            "error",
            {"type": "cancelled", "message": "KeyboardInterrupt"},
        )
