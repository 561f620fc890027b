"""``AuditedLLMClient``: chat completions against any OpenAI-compatible
endpoint, over an audited httpx client, recorded with ``call_type="llm"`` and
attributes named after the OpenTelemetry GenAI semantic conventions."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import httpx

from callindex.clients.http import DEFAULT_TIMEOUT, AsyncAuditedHTTPClient, AuditedHTTPClient
from callindex.recorder import CallRecorder
from callindex.redaction import Redactor
from callindex.retry import DEFAULT_HTTP_RETRY, RETRY_SAFE_EXTENSION, RetryPolicy

# Completions are safe to repeat: a retried POST costs tokens, never corrupts state.
_RETRY_SAFE: Final = {RETRY_SAFE_EXTENSION: True}


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


def _client_options(
    base_url: str, api_key: str | None, headers: dict[str, str] | None
) -> dict[str, Any]:
    sent = dict(headers or {})
    if api_key is not None:
        sent["Authorization"] = f"Bearer {api_key}"
    return {
        # base_url as the OpenAI SDK takes it: requests go to {base_url}/chat/completions.
        "base_url": base_url.rstrip("/") + "/",
        "headers": sent,
        "call_type": "llm",
        "annotator": GenAIAnnotator(),
    }


def _completion(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> Any:
    """The arguments of the POST of one completion (marked safe to retry)."""
    body = {"model": params.pop("model", model), "messages": messages, **params}
    return {"json": body, "extensions": _RETRY_SAFE}


ClientT = TypeVar("ClientT", AuditedHTTPClient, AsyncAuditedHTTPClient)


class _LLM(Generic[ClientT]):
    """The constructor both LLM clients share: an audited HTTP client of their kind."""

    _client_type: type[ClientT]

    def __init__(
        self,
        recorder: CallRecorder,
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
    ) -> None:
        self.model = model
        self.http: ClientT = self._client_type(
            recorder, state_id, retry=retry, timeout=timeout, redactor=redactor, inner=inner,
            **_client_options(base_url, api_key, headers),
        )  # fmt: skip


class AuditedLLMClient(_LLM[AuditedHTTPClient]):
    """``AuditedLLMClient(recorder, state_id, base_url="https://api.openai.com/v1",
    api_key=..., model="gpt-4o-mini").chat(messages)``. Each attempt is a
    recorded call; the API key only ever reaches the trail as a fingerprint."""

    _client_type = AuditedHTTPClient

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """One chat completion; raises ``httpx.HTTPStatusError`` on a final non-2xx."""
        response = self.http.post("chat/completions", **_completion(self.model, messages, params))
        response.raise_for_status()
        return ChatResult.from_response(response.json())

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
        response = await self.http.post(
            "chat/completions", **_completion(self.model, messages, params)
        )
        response.raise_for_status()
        return ChatResult.from_response(response.json())

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
