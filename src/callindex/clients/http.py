"""``AuditedHTTPClient`` and ``AsyncAuditedHTTPClient``: httpx clients whose
every attempt is recorded by an :class:`AuditedTransport` and retried under a
:class:`~callindex.retry.RetryPolicy`."""

from __future__ import annotations

import uuid
from typing import Any, Final

import httpx
from tenacity import AsyncRetrying, Retrying

from callindex.async_recorder import AsyncCallRecorder
from callindex.calls import CallType
from callindex.clients.transport import (
    ATTEMPT_EXTENSION,
    OPERATION_EXTENSION,
    Annotator,
    AuditedTransport,
)
from callindex.errors import ConfigurationError
from callindex.recorder import CallRecorder
from callindex.redaction import Redactor, check_header_values
from callindex.retry import (
    DEFAULT_HTTP_RETRY,
    NO_HTTP_RETRY,
    RETRY_STATUSES,
    RetryableResponse,
    RetryPolicy,
)

DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)


class _Attempts:
    """Numbers the attempts of one logical request and marks each on the request,
    so the transport records its attempt number and operation id."""

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.operation_id = str(uuid.uuid4())
        self.count = 0

    def next(self) -> httpx.Request:
        self.count += 1
        self.request.extensions = {
            **self.request.extensions,
            ATTEMPT_EXTENSION: self.count,
            OPERATION_EXTENSION: self.operation_id,
        }
        return self.request


def _retrying(client: _Audited, request: httpx.Request) -> dict[str, Any]:
    """The tenacity arguments for sending ``request``: the client's policy if
    the request may be repeated, with the retry log redacted as the trail is."""
    policy = client.retry_policy if client.retry_policy.allows(request) else NO_HTTP_RETRY
    redactor = client.audited_transport.redactor

    def redact(text: str) -> str:
        return redactor.text(
            text, redactor.secrets_in(str(request.url), request.headers.multi_items())
        )

    return policy.tenacity_arguments(redact)


class _Audited:
    """The constructor both audited clients share: an :class:`AuditedTransport`
    in front of ``inner``, and the retry policy their ``send`` applies."""

    def __init__(
        self,
        recorder: CallRecorder | AsyncCallRecorder,
        state_id: str,
        *,
        base_url: str | httpx.URL = "",
        headers: httpx._types.HeaderTypes | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = DEFAULT_HTTP_RETRY,
        redactor: Redactor | None = None,
        inner: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        call_type: CallType = "http",
        annotator: Annotator | None = None,
    ) -> None:
        if isinstance(recorder, AsyncCallRecorder) and not isinstance(self, httpx.AsyncClient):
            raise ConfigurationError(
                "an AsyncCallRecorder records for async clients: give a sync client a CallRecorder"
            )
        check_header_values(httpx.Headers(headers).multi_items())
        self.retry_policy = retry or NO_HTTP_RETRY
        self.audited_transport = transport = AuditedTransport(
            recorder, state_id, inner, call_type=call_type, redactor=redactor, annotator=annotator
        )
        super().__init__(  # type: ignore[call-arg]  # httpx.Client or httpx.AsyncClient
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )


class AuditedHTTPClient(_Audited, httpx.Client):
    """An ``httpx.Client`` that records every attempt of every request under
    ``state_id``, with its own database-allocated index, and retries under
    ``retry`` (``None``: never). ``inner`` is the transport that sends
    (default: httpx's own)."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        attempts = _Attempts(request)

        def attempt() -> httpx.Response:
            response = super(AuditedHTTPClient, self).send(attempts.next(), **kwargs)
            if response.status_code in RETRY_STATUSES:
                response.read()
                raise RetryableResponse(response)
            return response

        response: httpx.Response = Retrying(**_retrying(self, request))(attempt)
        return response


class AsyncAuditedHTTPClient(_Audited, httpx.AsyncClient):
    """The asyncio twin of :class:`AuditedHTTPClient`. Given an
    :class:`~callindex.AsyncCallRecorder` it awaits the recording; given a
    :class:`~callindex.CallRecorder`, it runs it in worker threads (bounded).
    The event loop is never blocked."""

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        attempts = _Attempts(request)

        async def attempt() -> httpx.Response:
            response = await super(AsyncAuditedHTTPClient, self).send(attempts.next(), **kwargs)
            if response.status_code in RETRY_STATUSES:
                await response.aread()
                raise RetryableResponse(response)
            return response

        response: httpx.Response = await AsyncRetrying(**_retrying(self, request))(attempt)
        return response
