"""``AuditedTransport``: records every request that passes through an httpx
(or httpx2) client as a two-phase call.

``begin_call`` writes a ``pending`` row with its index before the request is
sent; ``finish_call`` completes it when the response body has been read and
closed (or the request failed). No transaction is open while the request is
in flight. A failure to record ``begin_call`` means the request is not sent:
no external call goes unaudited.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, Final, Protocol, TypeVar

import anyio
import anyio.to_thread
import httpx

from callindex.async_recorder import AsyncCallRecorder
from callindex.calls import Call, CallType, FinalStatus
from callindex.clients.bodies import BodyTap
from callindex.errors import ConfigurationError
from callindex.recorder import CallRecorder
from callindex.redaction import Redactor, check_header_values, redact_library_logs

ATTEMPT_EXTENSION: Final = "callindex.attempt"
OPERATION_EXTENSION: Final = "callindex.operation_id"
DEFAULT_THREAD_LIMIT: Final = 8
T = TypeVar("T")


class Annotator(Protocol):
    """Adds semantic attributes (e.g. OpenTelemetry GenAI fields) to a record."""

    def request_attributes(self, body: Any) -> dict[str, Any]: ...

    def response_attributes(self, body: Any) -> dict[str, Any]: ...


class AuditedTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps ``inner`` (default: httpx's own HTTP transport) and records each
    request under ``state_id`` with ``call_type`` (``"http"`` by default).

    Works as the transport of an ``httpx.Client``/``AsyncClient`` and, relying
    only on the duck-typed transport surface, of an ``httpx2`` client with an
    ``httpx2`` inner transport (as the openai and anthropic SDKs use).

    In async use with an :class:`~callindex.AsyncCallRecorder`, the recording
    is awaited on the event loop; with a :class:`~callindex.CallRecorder` it
    runs in worker threads, at most ``thread_limit`` at once. Either way the
    event loop is never blocked. A sync client needs a ``CallRecorder``.
    """

    def __init__(
        self,
        recorder: CallRecorder | AsyncCallRecorder,
        state_id: str,
        inner: Any = None,
        *,
        call_type: CallType = "http",
        redactor: Redactor | None = None,
        annotator: Annotator | None = None,
        thread_limit: int = DEFAULT_THREAD_LIMIT,
    ) -> None:
        self.recorder = recorder
        self.state_id = state_id
        self.call_type: CallType = call_type
        self.redactor = redactor or Redactor.from_environment()
        redact_library_logs(self.redactor)
        self.annotator = annotator
        self._inner = inner
        self._limiter = anyio.CapacityLimiter(thread_limit)

    # Sync

    def handle_request(self, request: Any) -> Any:
        if isinstance(self.recorder, AsyncCallRecorder):
            raise ConfigurationError(
                "an AsyncCallRecorder records for async clients: give a sync client a CallRecorder"
            )
        if self._inner is None:
            self._inner = httpx.HTTPTransport()
        exchange = _Exchange(self, request)
        exchange.begin()
        try:
            response = self._inner.handle_request(request)
        except BaseException as error:  # KeyboardInterrupt too: finished as cancelled
            exchange.fail(error)
            raise
        if exchange.already_read(response):
            exchange.complete(complete=True)
            return response
        return exchange.watch(response)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()

    # Async

    async def handle_async_request(self, request: Any) -> Any:
        if self._inner is None:
            self._inner = httpx.AsyncHTTPTransport()
        exchange = _Exchange(self, request)
        try:
            # To its end: a task cancelled meanwhile still learns its call, and
            # finishes it as cancelled below instead of leaving it pending.
            await _to_its_end(self._begin(exchange))
            response = await self._inner.handle_async_request(request)
        except BaseException as error:  # cancellation too: finished as cancelled
            await self._finish(exchange.failure(error))
            raise
        if exchange.already_read(response):
            await self._finish(exchange.completion(complete=True))
            return response
        return exchange.watch(response)

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()

    async def _begin(self, exchange: _Exchange) -> None:
        if isinstance(self.recorder, AsyncCallRecorder):
            exchange.call = await self.recorder.begin_call(**exchange.begin_arguments())
        else:
            await anyio.to_thread.run_sync(exchange.begin, limiter=self._limiter)

    async def _finish(self, arguments: dict[str, Any] | None) -> None:
        """Record the call's end (``arguments`` of ``finish_call``; ``None``: it is
        recorded already), to its end even while the task is being cancelled."""
        if arguments is None:
            return
        recorder = self.recorder
        if isinstance(recorder, AsyncCallRecorder):
            await _to_its_end(recorder.finish_call(**arguments))
        else:
            finish = functools.partial(recorder.finish_call, **arguments)
            await _to_its_end(anyio.to_thread.run_sync(finish, limiter=self._limiter))


async def _to_its_end(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` to its end even if the task is cancelled meanwhile; the
    cancellation is raised once ``work`` has ended.

    A shielded anyio cancel scope keeps out the cancellation of an outer scope,
    but not one from asyncio itself (``Task.cancel()``, ``asyncio.wait_for``,
    ``asyncio.timeout``): on asyncio, ``work`` runs as a task of its own, which
    that cancellation does not reach.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio): the shield is enough
        with anyio.CancelScope(shield=True):
            return await work
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as error:
                if task.cancelled():
                    raise
                cancelled = error
            except BaseException:
                pass  # the task's own failure: task.result() raises it
    if cancelled is not None:
        task.exception()  # retrieved: a failure of the task gives way to the cancellation
        raise cancelled
    return task.result()


_MAX_REASON = 200  # characters of a server's reason phrase kept in the error payload


class _Exchange:
    """One request through the transport, from ``begin_call`` to ``finish_call``."""

    def __init__(self, transport: AuditedTransport, request: Any) -> None:
        self.transport = transport
        self.request = request
        self.started = time.perf_counter()
        self.call: Call | None = None
        self.response: Any = None
        self.headers_ms: float | None = None
        self.finished = False
        headers = list(request.headers.multi_items())
        check_header_values(headers)
        self.body = request_body(request)
        self.secrets = transport.redactor.secrets_in(str(request.url), headers, self.body)
        self.tap = BodyTap()

    def begin(self) -> None:
        recorder = self.transport.recorder
        assert isinstance(recorder, CallRecorder)
        self.call = recorder.begin_call(**self.begin_arguments())

    def fail(self, error: BaseException) -> None:
        """Record a request that got no (complete) response."""
        self._finish(self.failure(error))

    def complete(self, *, complete: bool) -> None:
        """Record the response once its body is read, or abandoned by the reader."""
        self._finish(self.completion(complete=complete))

    def _finish(self, arguments: dict[str, Any] | None) -> None:
        recorder = self.transport.recorder
        assert isinstance(recorder, CallRecorder)
        if arguments is not None:
            recorder.finish_call(**arguments)

    def begin_arguments(self) -> dict[str, Any]:
        """The arguments of the request's ``begin_call``."""
        redactor = self.transport.redactor
        record = redactor.body(self.body, self.secrets)
        payload: dict[str, Any] = {
            "method": self.request.method,
            "url": redactor.url(str(self.request.url)),
            "headers": redactor.headers(self.request.headers.multi_items()),
            "body": record,
        }
        extensions = self.request.extensions
        for key, name in ((ATTEMPT_EXTENSION, "attempt"), (OPERATION_EXTENSION, "operation_id")):
            if key in extensions:
                payload[name] = extensions[key]
        if self.transport.annotator and record and "json" in record:
            payload["attributes"] = self.transport.annotator.request_attributes(record["json"])
        return {
            "state_id": self.transport.state_id,
            "call_type": self.transport.call_type,
            "request": payload,
        }

    def failure(self, error: BaseException) -> dict[str, Any] | None:
        """The ``finish_call`` arguments of a request that got no (complete)
        response; ``None`` once the call is finished (or was never begun)."""
        if self.finished or self.call is None:
            return None
        self.finished = True
        if isinstance(error, Exception):
            message = self.transport.redactor.text(str(error), self.secrets)
            details = {"type": type(error).__name__, "message": message}
        else:  # KeyboardInterrupt, a cancelled task or timeout
            details = {"type": "cancelled", "message": type(error).__name__}
        return {
            "call_id": self.call.call_id,
            "status": "error",
            "response": self._response_payload(complete=False) if self.response else None,
            "error": details,
            "latency_ms": self._elapsed_ms(),
        }

    def completion(self, *, complete: bool) -> dict[str, Any] | None:
        """The ``finish_call`` arguments of a response whose body was read
        (``complete``) or abandoned; ``None`` once the call is finished."""
        if self.finished or self.call is None:
            return None
        self.finished = True
        code = self.response.status_code
        status: FinalStatus = "success" if 200 <= code < 300 else "error"
        error = None
        if status == "error":
            reason = self.transport.redactor.text(str(self.response.reason_phrase), self.secrets)
            error = {"type": "http_status", "status_code": code, "reason": reason[:_MAX_REASON]}
        return {
            "call_id": self.call.call_id,
            "status": status,
            "response": self._response_payload(complete=complete),
            "error": error,
            "latency_ms": self._elapsed_ms(),
        }

    def already_read(self, response: Any) -> bool:
        """Whether the inner transport handed back a response whose body it
        read already (a mock, a cache): then no stream is left to watch, and
        the body is taken as it is."""
        library = importlib.import_module(type(response).__module__.partition(".")[0])
        try:
            content = response.content
        except library.ResponseNotRead:
            return False
        self.response = response
        self.headers_ms = self._elapsed_ms()
        self.tap.feed(content)
        return True

    def watch(self, response: Any) -> Any:
        """Put a recording stream in front of the response body."""
        self.response = response
        self.headers_ms = self._elapsed_ms()
        library = type(response).__module__.partition(".")[0]  # "httpx" or "httpx2"
        response.stream = _recording_stream_type(library)(response.stream, self)
        return response

    def _response_payload(self, *, complete: bool) -> dict[str, Any]:
        response = self.response
        redactor = self.transport.redactor
        record = self.tap.record(response.headers.get("content-type"), complete=complete)
        record = redactor.body(record, self.secrets)
        payload: dict[str, Any] = {
            "status_code": response.status_code,
            "headers": redactor.headers(response.headers.multi_items()),
            "body": record,
            "time_to_headers_ms": self.headers_ms,
        }
        if self.transport.annotator and record and "json" in record:
            payload["attributes"] = self.transport.annotator.response_attributes(record["json"])
        return payload

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def request_body(request: Any) -> dict[str, Any] | None:
    """The body record of a request, before redaction (replay reduces requests
    with it too, so that both see a request the same way)."""
    try:
        content = bytes(request.content)
    except Exception:  # a streamed upload, not read: recorded without its body
        content = b""
    return BodyTap(content).record(request.headers.get("content-type"))


class _RecordingStreamBase:
    """Passes the body through to the reader and finishes the call on close."""

    def __init__(self, inner: Any, exchange: _Exchange) -> None:
        self._inner = inner
        self._exchange = exchange
        self._exhausted = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._exchange.tap.feed(chunk)
                yield chunk
        except (Exception, KeyboardInterrupt) as error:
            self._exchange.fail(error)
            raise
        self._exhausted = True

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._exchange.complete(complete=self._exhausted)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._exchange.tap.feed(chunk)
                yield chunk
        except (Exception, KeyboardInterrupt, anyio.get_cancelled_exc_class()) as error:
            await self._exchange.transport._finish(self._exchange.failure(error))
            raise
        self._exhausted = True

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._exchange.transport._finish(
                self._exchange.completion(complete=self._exhausted)
            )


@functools.cache
def _recording_stream_type(library_name: str) -> type[_RecordingStreamBase]:
    """A recording stream that the response's own library (httpx or httpx2)
    accepts: a subclass of that library's byte stream classes."""
    library = sys.modules[library_name]
    bases = (_RecordingStreamBase, library.SyncByteStream, library.AsyncByteStream)
    return type(f"Recording{library_name.title()}Stream", bases, {})
