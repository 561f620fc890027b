"""``AuditedLLMClient``: chat completions against any OpenAI-compatible
endpoint, over an audited httpx client, recorded with ``call_type="llm"`` and
attributes named after the OpenTelemetry GenAI semantic conventions.

A completion that cannot be returned raises a :class:`~callindex.errors.LLMError`
once its call is recorded and finished."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import httpx

from callindex.async_recorder import AsyncCallRecorder
from callindex.clients.http import DEFAULT_TIMEOUT, AsyncAuditedHTTPClient, AuditedHTTPClient
from callindex.clients.transport import ATTEMPT_EXTENSION, OPERATION_EXTENSION
from callindex.errors import (
    InvalidInputError,
    LLMContentFilteredError,
    LLMMalformedCompletionError,
    LLMRateLimitedError,
)
from callindex.recorder import CallRecorder
from callindex.redaction import Redactor
from callindex.retry import (
    DEFAULT_HTTP_RETRY,
    RETRY_SAFE_EXTENSION,
    RetryPolicy,
    retry_after_seconds,
)

# Completions are safe to repeat: a retried POST costs tokens, never corrupts state.
_RETRY_SAFE: Final = {RETRY_SAFE_EXTENSION: True}
PROVIDER_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
CONTENT_FILTER: Final = "content_filter"


@dataclass(frozen=True)
class Usage:
    input_tokens: int | None
    output_tokens: int | None


@dataclass(frozen=True)
class ChatResult:
    """The answer of a chat completion: its text, why it stopped, token usage,
    and the raw response body."""

    text: str
    finish_reason: str | None
    usage: Usage
    model: str | None
    raw: dict[str, Any]

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> ChatResult:
        choice = (body.get("choices") or [{}])[0]
        usage = body.get("usage") or {}
        return cls(
            text=(choice.get("message") or {}).get("content") or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage(usage.get("prompt_tokens"), usage.get("completion_tokens")),
            model=body.get("model"),
            raw=body,
        )


@dataclass(frozen=True)
class GenAIAnnotator:
    """OpenTelemetry GenAI attributes from chat completion bodies."""

    system: str = "openai"

    def request_attributes(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            return {}
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": self.system,
            "gen_ai.request.model": body.get("model"),
            "gen_ai.request.temperature": body.get("temperature"),
            "gen_ai.request.top_p": body.get("top_p"),
            "gen_ai.request.max_tokens": body.get("max_tokens")
            or body.get("max_completion_tokens"),
        }
        return {k: v for k, v in attributes.items() if v is not None}

    def response_attributes(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            return {}
        usage = body.get("usage") or {}
        reasons = [c.get("finish_reason") for c in body.get("choices") or [] if isinstance(c, dict)]
        attributes = {
            "gen_ai.response.id": body.get("id"),
            "gen_ai.response.model": body.get("model"),
            "gen_ai.response.finish_reasons": [r for r in reasons if r] or None,
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
        }
        return {k: v for k, v in attributes.items() if v is not None}


def _checked_provider(provider: object) -> str:
    if isinstance(provider, str) and PROVIDER_PATTERN.fullmatch(provider):
        return provider
    raise InvalidInputError(
        "provider must be 1 to 64 lower-case letters, digits, '_', '.' or '-', starting with a "
        f"letter or digit (e.g. 'openai', 'aws.bedrock'), not {provider!r:.80}"
    )


def _client_options(
    base_url: str, api_key: str | None, headers: dict[str, str] | None, provider: str
) -> dict[str, Any]:
    sent = dict(headers or {})
    if api_key is not None:
        sent["Authorization"] = f"Bearer {api_key}"
    return {
        # base_url as the OpenAI SDK takes it: requests go to {base_url}/chat/completions.
        "base_url": base_url.rstrip("/") + "/",
        "headers": sent,
        "call_type": "llm",
        "annotator": GenAIAnnotator(system=provider),
    }


def _completion(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> Any:
    """The arguments of the POST of one completion (marked safe to retry)."""
    body = {"model": params.pop("model", model), "messages": messages, **params}
    return {"json": body, "extensions": _RETRY_SAFE}


def _chat_result(response: httpx.Response) -> ChatResult:
    """The completion in a final response, read and closed (so its call is
    finished), or the error it calls for."""
    extensions = response.request.extensions
    call: dict[str, Any] = {
        "status_code": response.status_code,
        "response_body": _json_or_none(response),
        "operation_id": extensions.get(OPERATION_EXTENSION),
        "attempts": extensions.get(ATTEMPT_EXTENSION),
    }
    if response.status_code == 429:
        raise LLMRateLimitedError(
            f"still rate limited (HTTP 429) after {call['attempts'] or 1} attempt(s)",
            retry_after=retry_after_seconds(response.headers),
            **call,
        )
    response.raise_for_status()
    body = call["response_body"]

    def malformed(problem: str) -> LLMMalformedCompletionError:
        return LLMMalformedCompletionError(f"malformed chat completion: {problem}", **call)

    if not isinstance(body, dict):
        raise malformed("the body is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise malformed("no choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise malformed("choices[0] is not an object")
    reason = choice.get("finish_reason")
    reason = reason if isinstance(reason, str) else None
    if reason == CONTENT_FILTER:
        raise LLMContentFilteredError(
            "the completion was withheld by the content filter", finish_reason=reason, **call
        )
    message = choice.get("message")
    if not isinstance(message, dict):
        raise malformed("choices[0] has no message object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise malformed("choices[0].message.content is neither a string nor null")
    if content is None and not message.get("tool_calls"):
        raise LLMContentFilteredError(
            f"the completion has neither content nor tool calls (finish_reason {reason!r})",
            finish_reason=reason,
            **call,
        )
    return ChatResult.from_response(body)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


ClientT = TypeVar("ClientT", AuditedHTTPClient, AsyncAuditedHTTPClient)


class _LLM(Generic[ClientT]):
    """The constructor both LLM clients share: an audited HTTP client of their kind."""

    _client_type: type[ClientT]

    def __init__(
        self,
        recorder: CallRecorder | AsyncCallRecorder,
        state_id: str,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        retry: RetryPolicy | None = DEFAULT_HTTP_RETRY,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
        redactor: Redactor | None = None,
        inner: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        provider: str = "openai",
    ) -> None:
        self.model = model
        self.provider = _checked_provider(provider)
        self.http: ClientT = self._client_type(
            recorder, state_id, retry=retry, timeout=timeout, redactor=redactor, inner=inner,
            **_client_options(base_url, api_key, headers, self.provider),
        )  # fmt: skip


class AuditedLLMClient(_LLM[AuditedHTTPClient]):
    """``AuditedLLMClient(recorder, state_id, base_url="https://api.openai.com/v1",
    api_key=..., model="gpt-4o-mini").chat(messages)``. Each attempt is a
    recorded call; the API key only ever reaches the trail as a fingerprint.
    ``provider`` (default ``"openai"``; e.g. ``"anthropic"``, ``"aws.bedrock"``)
    is recorded as ``gen_ai.system``; anything but 1 to 64 lower-case letters,
    digits, ``_``, ``.`` or ``-`` raises :class:`~callindex.errors.InvalidInputError`."""

    _client_type = AuditedHTTPClient

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """One chat completion, retried under the client's policy. Whatever it
        raises, every attempt is recorded and finished first.

        Raises:
            LLMRateLimitedError: the last attempt still got a 429.
            LLMContentFilteredError: a 200 with ``finish_reason`` ``content_filter``,
                or with neither content nor tool calls.
            LLMMalformedCompletionError: a 200 whose body is not a chat completion.
            httpx.HTTPStatusError: any other final non-2xx response.
            httpx.TransportError: the last attempt got no response (connect error,
                timeout, dropped connection).
            CallIndexError: the call could not be recorded (then nothing was sent).
        """
        response = self.http.post("chat/completions", **_completion(self.model, messages, params))
        return _chat_result(response)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AuditedLLMClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncAuditedLLMClient(_LLM[AsyncAuditedHTTPClient]):
    """The asyncio twin of :class:`AuditedLLMClient`."""

    _client_type = AsyncAuditedHTTPClient

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """One chat completion, retried under the client's policy. Whatever it
        raises, every attempt is recorded and finished first.

        Raises:
            LLMRateLimitedError: the last attempt still got a 429.
            LLMContentFilteredError: a 200 with ``finish_reason`` ``content_filter``,
                or with neither content nor tool calls.
            LLMMalformedCompletionError: a 200 whose body is not a chat completion.
            httpx.HTTPStatusError: any other final non-2xx response.
            httpx.TransportError: the last attempt got no response (connect error,
                timeout, dropped connection).
            CallIndexError: the call could not be recorded (then nothing was sent).
        """
        response = await self.http.post(
            "chat/completions", **_completion(self.model, messages, params)
        )
        return _chat_result(response)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncAuditedLLMClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
