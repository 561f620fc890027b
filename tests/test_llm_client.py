"""The LLM clients: the provider is recorded as ``gen_ai.system``, and the
outcomes a pipeline branches on raise typed errors, each only once its call is
recorded and finished in the ``calls`` table."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from callindex import (
    AsyncAuditedLLMClient,
    AuditedLLMClient,
    CallIndexError,
    CallRecorder,
    ChatResult,
    InvalidInputError,
    LLMContentFilteredError,
    LLMError,
    LLMMalformedCompletionError,
    LLMRateLimitedError,
    RetryPolicy,
    Usage,
)
from callindex.loopback import LoopbackAPI, Reply

from conftest import call_rows

API_KEY = "sk-planted-llm-key-0042"
FAST = RetryPolicy(max_attempts=3, initial_wait=0.01, max_wait=0.02)
HI = [{"role": "user", "content": "hi"}]
RATE_LIMITED = {"error": {"message": "rate limited"}}


def completion(message: Any, finish_reason: str | None = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}],
    }


@pytest.fixture
def api() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as server:
        yield server


@pytest.fixture
def opened(recorder: CallRecorder) -> CallRecorder:
    recorder.open_state("s1")
    return recorder


def llm_client(recorder: CallRecorder, api: LoopbackAPI, **options: Any) -> AuditedLLMClient:
    options = {"retry": FAST, **options}
    return AuditedLLMClient(
        recorder, "s1", base_url=f"{api.url}/v1", model="m", api_key=API_KEY, **options
    )


def chat_async(recorder: CallRecorder, api: LoopbackAPI, **options: Any) -> ChatResult:
    async def main() -> ChatResult:
        async with AsyncAuditedLLMClient(
            recorder, "s1", base_url=f"{api.url}/v1", model="m", api_key=API_KEY,
            **{"retry": FAST, **options},
        ) as llm:  # fmt: skip
            return await llm.chat(HI)

    return asyncio.run(main())


def recorded(recorder: CallRecorder) -> list[tuple[str, int | None]]:
    """(status, HTTP status code) of every call of ``s1``, each checked finished."""
    calls = recorder.calls("s1")
    assert all(c.completed_at is not None and c.latency_ms is not None for c in calls)
    return [(c.status, (c.response or {}).get("status_code")) for c in calls]


def assert_no_secret(error: BaseException) -> None:
    assert API_KEY not in str(error) and API_KEY not in repr(error)


class TestProvider:
    def test_the_default_provider_is_openai(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        with llm_client(opened, api) as llm:
            llm.chat(HI)
        assert llm.provider == "openai"
        [call] = opened.calls("s1")
        assert call.request["attributes"]["gen_ai.system"] == "openai"

    @pytest.mark.parametrize("provider", ["anthropic", "azure.ai.openai", "aws.bedrock", "gw-2_x"])
    def test_the_provider_is_recorded_as_gen_ai_system(
        self, opened: CallRecorder, api: LoopbackAPI, provider: str
    ) -> None:
        with llm_client(opened, api, provider=provider) as llm:
            llm.chat(HI)
        assert llm.provider == provider
        chat_async(opened, api, provider=provider)
        calls = opened.calls("s1")
        assert [c.request["attributes"]["gen_ai.system"] for c in calls] == [provider] * 2

    def test_a_bad_provider_is_refused_before_anything_is_written(
        self, opened: CallRecorder, api: LoopbackAPI, db_url: str
    ) -> None:
        bad = ["", "OpenAI", "open ai", "openai\n", "-openai", "openai/v1", "a" * 65, None, 7]
        for provider, client_type in itertools.product(
            bad, (AuditedLLMClient, AsyncAuditedLLMClient)
        ):
            with pytest.raises(InvalidInputError, match="provider must be") as caught:
                client_type(
                    opened, "s1", base_url=f"{api.url}/v1", model="m", api_key=API_KEY,
                    provider=provider,
                )  # fmt: skip
            assert_no_secret(caught.value)
        assert call_rows(db_url) == []
        assert api.stats["requests"] == 0


class TestRateLimited:
    @pytest.mark.parametrize(
        ("retry", "attempts"),
        [pytest.param(FAST, 3, id="retried"), pytest.param(None, 1, id="no-retries")],
    )
    def test_a_429_on_the_last_attempt_raises_llm_rate_limited_error(
        self, opened: CallRecorder, api: LoopbackAPI, retry: RetryPolicy | None, attempts: int
    ) -> None:
        api.plan(*[Reply.too_many_requests("0")] * 3)
        with (
            llm_client(opened, api, retry=retry) as llm,
            pytest.raises(LLMRateLimitedError) as caught,
        ):
            llm.chat(HI)
        error = caught.value
        assert isinstance(error, LLMError) and isinstance(error, CallIndexError)
        assert (error.status_code, error.response_body) == (429, RATE_LIMITED)
        assert (error.attempts, error.retry_after) == (attempts, 0.0)
        assert_no_secret(error)
        assert recorded(opened) == [("error", 429)] * attempts
        calls = opened.calls("s1")
        assert [c.request["attempt"] for c in calls] == list(range(1, attempts + 1))
        assert {c.request["operation_id"] for c in calls} == {error.operation_id}
        assert api.stats["requests"] == attempts

    @pytest.mark.parametrize(("status", "attempts"), [(400, 1), (401, 1), (503, 3)])
    def test_any_other_final_non_2xx_raises_http_status_error(
        self, opened: CallRecorder, api: LoopbackAPI, status: int, attempts: int
    ) -> None:
        api.plan(*[Reply(status, body={"error": {"message": "no"}})] * 3)
        with llm_client(opened, api) as llm, pytest.raises(httpx.HTTPStatusError) as caught:
            llm.chat(HI)
        assert caught.value.response.status_code == status
        assert_no_secret(caught.value)
        assert recorded(opened) == [("error", status)] * attempts

    def test_async(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(*[Reply.too_many_requests("0")] * 3)
        with pytest.raises(LLMRateLimitedError) as caught:
            chat_async(opened, api)
        assert (caught.value.status_code, caught.value.attempts) == (429, 3)
        assert_no_secret(caught.value)
        assert recorded(opened) == [("error", 429)] * 3


FILTERED = [
    pytest.param({"role": "assistant", "content": None}, "content_filter", id="null-content"),
    pytest.param({"role": "assistant"}, "content_filter", id="no-content"),
    pytest.param({"role": "assistant", "content": "Once upon"}, "content_filter", id="cut-short"),
    pytest.param(None, "content_filter", id="no-message"),
    pytest.param({"role": "assistant", "content": None}, "stop", id="null-content-no-tool-calls"),
]


class TestContentFiltered:
    @pytest.mark.parametrize(("message", "finish_reason"), FILTERED)
    def test_raises_llm_content_filtered_error_once_the_call_is_recorded_as_a_success(
        self, opened: CallRecorder, api: LoopbackAPI, message: Any, finish_reason: str
    ) -> None:
        body = completion(message, finish_reason)
        api.plan(Reply(body=body))
        with llm_client(opened, api) as llm, pytest.raises(LLMContentFilteredError) as caught:
            llm.chat(HI)
        error = caught.value
        assert isinstance(error, LLMError)
        assert (error.finish_reason, error.status_code, error.response_body) == (
            finish_reason, 200, body
        )  # fmt: skip
        assert_no_secret(error)
        assert recorded(opened) == [("success", 200)]  # what the server returned, faithfully
        [call] = opened.calls("s1")
        assert call.response["body"]["json"] == body
        assert call.response["attributes"]["gen_ai.response.finish_reasons"] == [finish_reason]

    def test_tool_calls_without_content_are_a_result(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        tool_call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
        api.plan(Reply(body=completion(message, "tool_calls")))
        with llm_client(opened, api) as llm:
            result = llm.chat(HI)
        assert (result.text, result.finish_reason) == ("", "tool_calls")
        assert result.raw["choices"][0]["message"]["tool_calls"] == [tool_call]

    def test_async(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(Reply(body=completion({"role": "assistant", "content": None}, "content_filter")))
        with pytest.raises(LLMContentFilteredError) as caught:
            chat_async(opened, api)
        assert (caught.value.finish_reason, caught.value.status_code) == ("content_filter", 200)
        assert recorded(opened) == [("success", 200)]

    def test_a_response_the_inner_transport_read_already_is_judged_the_same(
        self, opened: CallRecorder
    ) -> None:
        body = completion({"role": "assistant", "content": None}, "content_filter")
        inner = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
        with (
            AuditedLLMClient(
                opened, "s1", base_url="http://llm.test/v1", model="m", inner=inner
            ) as llm,
            pytest.raises(LLMContentFilteredError),
        ):
            llm.chat(HI)
        assert recorded(opened) == [("success", 200)]


MALFORMED = [
    pytest.param(Reply(raw=b"<html>502 Bad Gateway</html>"), None, id="not-json"),
    pytest.param(Reply(raw=b'{"choices": ['), None, id="truncated-json"),
    pytest.param(Reply(raw=b"null"), None, id="json-null"),
    pytest.param(Reply(raw=b'[{"choices": []}]'), [{"choices": []}], id="json-array"),
    pytest.param(Reply(body="a completion"), "a completion", id="json-string"),
    pytest.param(Reply(body={"id": "chatcmpl-1"}), {"id": "chatcmpl-1"}, id="no-choices"),
    pytest.param(Reply(body={"choices": "stop"}), {"choices": "stop"}, id="choices-not-a-list"),
    pytest.param(Reply(body={"choices": []}), {"choices": []}, id="empty-choices"),
    pytest.param(Reply(body={"choices": ["hi"]}), {"choices": ["hi"]}, id="choice-not-an-object"),
    pytest.param(Reply(body=completion(None)), completion(None), id="no-message"),
    pytest.param(Reply(body=completion("hi")), completion("hi"), id="message-not-an-object"),
    pytest.param(
        Reply(body=completion({"content": 42})), completion({"content": 42}), id="number-content"
    ),
    pytest.param(
        Reply(body=completion({"content": [{"type": "text", "text": "hi"}]})),
        completion({"content": [{"type": "text", "text": "hi"}]}),
        id="list-content",
    ),
]


class TestMalformedCompletion:
    @pytest.mark.parametrize(("reply", "parsed"), MALFORMED)
    def test_raises_llm_malformed_completion_error_once_the_call_is_recorded(
        self, opened: CallRecorder, api: LoopbackAPI, reply: Reply, parsed: Any
    ) -> None:
        api.plan(reply)
        with llm_client(opened, api) as llm, pytest.raises(LLMMalformedCompletionError) as caught:
            llm.chat(HI)
        error = caught.value
        assert isinstance(error, LLMError)
        assert (error.status_code, error.response_body) == (200, parsed)
        assert str(error).startswith("malformed chat completion: ")
        assert_no_secret(error)
        assert recorded(opened) == [("success", 200)]
        assert api.stats["requests"] == 1  # a 200 is not retried, however broken

    def test_async(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        api.plan(Reply(raw=b"<html>502 Bad Gateway</html>"))
        with pytest.raises(LLMMalformedCompletionError) as caught:
            chat_async(opened, api)
        assert (caught.value.status_code, caught.value.response_body) == (200, None)
        assert recorded(opened) == [("success", 200)]


class TestCompletion:
    def test_a_normal_completion_is_still_a_chat_result(
        self, opened: CallRecorder, api: LoopbackAPI
    ) -> None:
        with llm_client(opened, api) as llm:
            result = llm.chat(HI)
        assert (result.text, result.finish_reason, result.model) == ("echo: hi", "stop", "m")
        assert result.usage == Usage(input_tokens=1, output_tokens=2)
        assert recorded(opened) == [("success", 200)]

    def test_async(self, opened: CallRecorder, api: LoopbackAPI) -> None:
        result = chat_async(opened, api)
        assert (result.text, result.finish_reason) == ("echo: hi", "stop")
        assert recorded(opened) == [("success", 200)]
