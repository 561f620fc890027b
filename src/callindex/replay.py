"""Replay from the trail: serve the recorded responses of a state again,
without touching the network, and compare two states call by call.

:class:`ReplayTransport` stands in for the network under an httpx or httpx2
client (the audited clients, the openai SDK). Each incoming request is reduced
to the redacted form :class:`~callindex.clients.transport.AuditedTransport`
records, and its *fingerprint* (method, URL and a hash of the body) is matched
against the recorded calls. :func:`diff_states` compares two states with the
same fingerprints, so matching and ``callindex diff`` agree on what "the
same call" means.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import anyio.to_thread
import httpx

from callindex import payloads
from callindex.calls import Call
from callindex.clients.transport import request_body
from callindex.errors import InvalidInputError, ReplayMismatchError, UnknownStateError
from callindex.recorder import CallRecorder
from callindex.redaction import DROPPED, Redactor

ReplayMode = Literal["strict", "lenient"]
MODES: Final = ("strict", "lenient")
REPLAYED_STATUSES: Final = frozenset({"success", "error"})
# What a redactor puts in place of a secret; with a key, its HMAC differs per
# secret, so replay compares every secret as equal to every other.
_SECRET_FINGERPRINT: Final = re.compile(r"hmac-sha256:[0-9a-f]{64}")
# Body fields that are the content itself (not its length, which re-encoding changes).
_CONTENT_FIELDS: Final = ("json", "text", "base64", "sha256", "truncated", "incomplete")
# Headers the rebuilt response computes from the body it is given.
_RECOMPUTED_HEADERS: Final = frozenset({"content-length", "transfer-encoding"})
_MATCHED: Final = ("method", "url", "body")


# Fingerprints: one definition for matching and for diff


def is_exchange(request: Any) -> bool:
    """Whether a recorded request payload is an HTTP exchange that replay can serve."""
    return isinstance(request, dict) and "method" in request and "url" in request


def request_fingerprint(request: Any) -> dict[str, Any]:
    """What replay matches a request on: method, redacted URL and the hash of the
    body's content. Attempt numbers, operation ids, headers and the values of
    secrets (whatever key fingerprinted them) are not part of it. A payload that
    is not an HTTP exchange is fingerprinted whole, without those."""
    if not is_exchange(request):
        if isinstance(request, dict):
            request = {k: v for k, v in request.items() if k not in ("attempt", "operation_id")}
        return {"request": _content_hash(request)}
    return {
        "method": str(request["method"]).upper(),
        "url": _without_secrets(request["url"]),
        "body": body_hash(request.get("body")),
    }


def response_fingerprint(call: Call) -> dict[str, Any]:
    """What ``callindex diff`` compares of an outcome: the status code and the
    hash of the body's content, or the error type when no response came."""
    response = call.response if isinstance(call.response, dict) else {}
    return {
        "status": call.status,
        "status_code": response.get("status_code"),
        "body": body_hash(response.get("body")),
        "error": _error_type(call),
    }


def _error_type(call: Call) -> str | None:
    return str(call.error.get("type")) if isinstance(call.error, dict) else None


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """SHA-256 over the RFC 8785 form of a fingerprint."""
    return _content_hash(fingerprint)


def body_hash(record: Any) -> str | None:
    """The hash of a body record's content (``None`` for no body)."""
    if not isinstance(record, dict):
        return None
    return _content_hash({k: record[k] for k in _CONTENT_FIELDS if k in record})


def _content_hash(value: Any) -> str:
    canonical = payloads.canonical_json(_without_secrets(value))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _without_secrets(value: Any) -> Any:
    if isinstance(value, str):
        return _SECRET_FINGERPRINT.sub(DROPPED, value)
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_secrets(item) for item in value]
    return value


# The transport


class ReplayTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Serves the recorded responses of ``state_id``, in ``call_index`` order,
    to an httpx or httpx2 client (sync or async), without touching the network.

    ``mode="strict"``: each request must match the next recorded call (method,
    redacted URL, body), else :class:`~callindex.errors.ReplayMismatchError`.
    ``mode="lenient"``: each request gets the first recorded call not served
    yet whose fingerprint equals its own. Calls recorded without a response
    raise the transport error they got (``RemoteProtocolError``, ``ConnectError``,
    a timeout), so a client's retries replay as they happened. ``redactor``
    must redact as the recording did (default: from the environment).
    """

    def __init__(
        self,
        recorder: CallRecorder,
        state_id: str,
        mode: ReplayMode = "strict",
        *,
        redactor: Redactor | None = None,
    ) -> None:
        if mode not in MODES:
            raise InvalidInputError(f"mode must be 'strict' or 'lenient', not {mode!r:.40}")
        self.recorder = recorder
        self.state_id = state_id
        self.mode: ReplayMode = mode
        self.redactor = redactor or Redactor.from_environment()
        self._recorded: list[Call] | None = None
        self._served: list[bool] = []
        self._expected: list[dict[str, Any]] = []  # each recorded call's fingerprint
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int | None:
        """How many recorded calls have not been served (``None`` before the first request)."""
        return None if self._recorded is None else self._served.count(False)

    def handle_request(self, request: Any) -> Any:
        self._load()
        return self._serve(request)

    async def handle_async_request(self, request: Any) -> Any:
        if self._recorded is None:
            await anyio.to_thread.run_sync(self._load)
        return self._serve(request)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def _load(self) -> None:
        """Read the state's finished HTTP exchanges once, on the first request."""
        with self._lock:
            if self._recorded is not None:
                return
            calls = self.recorder.calls(self.state_id)
            if not calls and not self.recorder.is_open(self.state_id):
                raise UnknownStateError(self.state_id)
            self._recorded = [
                c
                for c in calls
                if is_exchange(c.request)
                and c.status in REPLAYED_STATUSES
                and _error_type(c) != "cancelled"  # interrupted here, not by the network
            ]
            self._served = [False] * len(self._recorded)
            self._expected = [request_fingerprint(c.request) for c in self._recorded]

    def _serve(self, request: Any) -> Any:
        fingerprint = self._fingerprint(request)
        with self._lock:
            position = self._match(fingerprint)
            self._served[position] = True
            assert self._recorded is not None
            call = self._recorded[position]
        return replayed(call, request)

    def _fingerprint(self, request: Any) -> dict[str, Any]:
        """The request reduced as :class:`AuditedTransport` records it, then fingerprinted."""
        url = str(request.url)
        body = request_body(request)
        secrets = self.redactor.secrets_in(url, request.headers.multi_items(), body)
        payload = {
            "method": request.method,
            "url": self.redactor.url(url),
            "body": self.redactor.body(body, secrets),
        }
        return request_fingerprint(payload)

    def _match(self, fingerprint: dict[str, Any]) -> int:
        assert self._recorded is not None
        unserved = [i for i, served in enumerate(self._served) if not served]
        if not unserved:
            raise self._mismatch(
                None, f"all {len(self._recorded)} recorded call(s) have been served", fingerprint
            )
        if self.mode == "lenient":
            for position in unserved:
                if self._expected[position] == fingerprint:
                    return position
            raise self._mismatch(None, "no recorded call left matches", fingerprint)
        position = unserved[0]
        expected = self._expected[position]
        differing = [name for name in _MATCHED if expected[name] != fingerprint[name]]
        if differing:
            call = self._recorded[position]
            raise self._mismatch(call, f"{', '.join(differing)} differ(s)", fingerprint, differing)
        return position

    def _mismatch(
        self,
        call: Call | None,
        problem: str,
        fingerprint: dict[str, Any],
        differing: Iterable[str] = (),
    ) -> ReplayMismatchError:
        where = f"call_index {call.call_index}" if call else "the request"
        request = f"{fingerprint['method']} {fingerprint['url']}"
        if call is not None:
            recorded = request_fingerprint(call.request)
            request += f" (recorded: {recorded['method']} {recorded['url']})"
        return ReplayMismatchError(
            f"replay of state {self.state_id!r} ({self.mode}): {where}: {problem}: {request}",
            state_id=self.state_id,
            call_index=call.call_index if call else None,
            differing=tuple(differing),
        )


def replayed(call: Call, request: Any) -> Any:
    """The recorded outcome of ``call`` as the request's own library builds it:
    a response, or the transport error the call got (after the bytes that
    came, for a body that broke off)."""
    library = importlib.import_module(type(request).__module__.partition(".")[0])
    response = call.response
    if not isinstance(response, dict) or "status_code" not in response:
        raise transport_error(library, call.error, request)
    record = response.get("body")
    if isinstance(record, dict) and record.get("truncated"):
        raise ReplayMismatchError(
            f"call_index {call.call_index} cannot be replayed: its body was stored cut "
            f"to its first part ({record.get('length')} bytes in all)",
            state_id=call.state_id,
            call_index=call.call_index,
            differing=("body",),
        )
    headers = [
        (name, value)
        for name, value in (response.get("headers") or {}).items()
        if name.lower() not in _RECOMPUTED_HEADERS
    ]
    content = body_bytes(record)
    if _error_type(call) not in (None, "http_status"):
        failure = transport_error(library, call.error, request)
        return library.Response(
            response["status_code"],
            headers=headers,
            stream=_broken_stream(library, content, failure),
            request=request,
        )
    try:
        rebuilt = library.Response(
            response["status_code"], headers=headers, content=content, request=request
        )
        rebuilt.read()
    except library.DecodingError:
        # The body was recorded decoded (a transport that read it first):
        # served without the encoding it no longer has.
        plain = [(n, v) for n, v in headers if n.lower() != "content-encoding"]
        rebuilt = library.Response(
            response["status_code"], headers=plain, content=content, request=request
        )
    return rebuilt


def _broken_stream(library: Any, content: bytes, failure: Exception) -> Any:
    """A body that yields what was recorded, then fails as it did."""

    class BrokenOff(library.SyncByteStream, library.AsyncByteStream):  # type: ignore[misc]
        def __iter__(self) -> Iterator[bytes]:
            if content:
                yield content
            raise failure

        async def __aiter__(self) -> AsyncIterator[bytes]:
            if content:
                yield content
            raise failure

    return BrokenOff()


def body_bytes(record: Any) -> bytes:
    """The bytes of a recorded body: its JSON (compact), text or base64 content."""
    if not isinstance(record, dict):
        return b""
    if "json" in record:
        text = json.dumps(record["json"], separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")
    if "text" in record:
        return str(record["text"]).encode("utf-8")
    if "base64" in record:
        return base64.b64decode(record["base64"])
    return b""


def transport_error(library: Any, error: Any, request: Any) -> Exception:
    """The library's exception of the recorded error type (else its
    ``TransportError``), with the recorded (redacted) message."""
    details = error if isinstance(error, dict) else {}
    name = str(details.get("type") or "")
    found = getattr(library, name, None) if name.isidentifier() else None
    error_type = library.TransportError
    if isinstance(found, type) and issubclass(found, library.TransportError):
        error_type = found
    failure: Exception = error_type(str(details.get("message") or name), request=request)
    return failure


# Comparing two states


@dataclass(frozen=True)
class CallDifference:
    """A pair of calls (the n-th of each state in index order) that differ."""

    position: int
    index_a: int | None
    index_b: int | None
    differing: tuple[str, ...]
    """``request``, ``response``, or ``missing`` when one state has fewer calls."""

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "index_a": self.index_a,
            "index_b": self.index_b,
            "differing": list(self.differing),
        }


def diff_states(
    recorder: CallRecorder, state_a: str, state_b: str
) -> tuple[list[Call], list[Call], list[CallDifference]]:
    """The calls of both states and the pairs (by position in index order) whose
    request or response fingerprints differ."""
    calls_a, calls_b = _calls_of(recorder, state_a), _calls_of(recorder, state_b)
    differences = []
    for position in range(max(len(calls_a), len(calls_b))):
        a = calls_a[position] if position < len(calls_a) else None
        b = calls_b[position] if position < len(calls_b) else None
        differing = _differing(a, b)
        if differing:
            index_a, index_b = (c.call_index if c else None for c in (a, b))
            differences.append(CallDifference(position, index_a, index_b, differing))
    return calls_a, calls_b, differences


def _calls_of(recorder: CallRecorder, state_id: str) -> list[Call]:
    calls = recorder.calls(state_id)
    if not calls and not recorder.is_open(state_id):
        raise UnknownStateError(state_id)
    return calls


def _differing(a: Call | None, b: Call | None) -> tuple[str, ...]:
    if a is None or b is None:
        return ("missing",)
    found = []
    if fingerprint_hash(request_fingerprint(a.request)) != fingerprint_hash(
        request_fingerprint(b.request)
    ):
        found.append("request")
    if fingerprint_hash(response_fingerprint(a)) != fingerprint_hash(response_fingerprint(b)):
        found.append("response")
    return tuple(found)
