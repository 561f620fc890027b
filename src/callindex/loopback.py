"""A loopback API server that can be told to fail.

It answers like a small HTTP JSON API and like an OpenAI-compatible chat
endpoint, on 127.0.0.1 at a random port, from a thread of the calling process.
The demo and the tests use it; nothing here talks to any other address.

Endpoints: ``GET /items/<id>``, ``POST /echo``, ``POST /v1/chat/completions``
(``"stream": true`` sends server-sent events), ``GET /stream?chunks=N&size=B&delay=S``,
``GET /binary``.

Faults come two ways: ``plan(...)`` queues exact replies for the next requests
(deterministic tests), and :class:`Faults` rates inject them at random
(the demo): 429 with ``Retry-After``, 503, slow responses, dropped connections.
The standard library's threading HTTP server is enough here, and it lets a
reply drop the connection without answering, which test-server libraries do not.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Reply:
    """One planned reply: a status with headers and a JSON body (or ``raw``
    bytes sent as they are, labelled JSON, as a broken server might), a delay
    before answering, or ``drop=True`` to close the connection without an answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0
    drop: bool = False
    raw: bytes | None = None

    @classmethod
    def too_many_requests(cls, retry_after: str = "0") -> Reply:
        return cls(429, {"Retry-After": retry_after}, {"error": {"message": "rate limited"}})


@dataclass(frozen=True)
class Faults:
    """Rates (0..1) of injected faults, drawn per request from a seeded generator."""

    rate_429: float = 0.0
    rate_503: float = 0.0
    rate_slow: float = 0.0
    rate_drop: float = 0.0
    retry_after_ms: int = 50
    slow_seconds: float = 0.3
    seed: int = 0


class LoopbackAPI:
    """``with LoopbackAPI() as api: httpx.get(api.url + "/items/1")``"""

    def __init__(self, faults: Faults | None = None, *, latency: float = 0.0) -> None:
        self.faults = faults or Faults()
        self.latency = latency
        self.stats: Counter[str] = Counter()
        self.peak_in_flight = 0
        self._in_flight = 0
        self._planned: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._random = random.Random(self.faults.seed)
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LoopbackAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LoopbackAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def plan(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order, before anything else."""
        with self._lock:
            self._planned.extend(replies)

    def _next_fault(self) -> Reply | None:
        with self._lock:
            if self._planned:
                return self._planned.popleft()
            faults, draw = self.faults, self._random.random()
        for rate, reply in (
            (faults.rate_429, Reply(429, {"retry-after-ms": str(faults.retry_after_ms)})),
            (faults.rate_503, Reply(503, body={"error": {"message": "unavailable"}})),
            (faults.rate_drop, Reply(drop=True)),
            (faults.rate_slow, Reply(delay=faults.slow_seconds, status=0)),
        ):
            if draw < rate:
                return reply
            draw -= rate
        return None

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _leave(self, outcome: str) -> None:
        with self._lock:
            self._in_flight -= 1
            self.stats[outcome] += 1
            self.stats["requests"] += 1


class _Server(ThreadingHTTPServer):
    # The default listen backlog of 5 resets connections under a burst of
    # concurrent clients, which would look like injected faults.
    request_queue_size = 512


def _handler_for(api: LoopbackAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as separate writes: without this, a kept-alive
        # client waits for a delayed ACK (about 40 ms) on every reply.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            api._enter()
            outcome = "error"
            try:
                outcome = self._answer(raw)
            finally:
                api._leave(outcome)

        def _answer(self, raw: bytes) -> str:
            if api.latency:
                time.sleep(api.latency)
            fault = api._next_fault()
            if fault is not None:
                time.sleep(fault.delay)
                if fault.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return "dropped"
                if fault.status:
                    data = json.dumps(fault.body or {}).encode() if fault.raw is None else fault.raw
                    self._send(fault.status, data, "application/json", fault.headers)
                    return str(fault.status)
            return self._route(raw)

        def _route(self, raw: bytes) -> str:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = _parsed(raw)
            if url.path.startswith("/items/"):
                item = url.path.removeprefix("/items/")
                self._send_json(200, {"id": item, "name": f"item-{item}"})
            elif url.path == "/echo":
                self._send_json(200, {"received": body})
            elif url.path.endswith("/chat/completions"):
                return self._chat(body or {})
            elif url.path == "/stream":
                self._stream(int(query.get("chunks", 5)), int(query.get("size", 10)),
                             float(query.get("delay", 0)))  # fmt: skip
            elif url.path == "/binary":
                self._send(200, bytes(range(256)) * 4, "application/octet-stream")
            else:
                self._send_json(404, {"error": {"message": f"no route {url.path}"}})
                return "404"
            return "200"

        def _chat(self, request: dict[str, Any]) -> str:
            messages = request.get("messages") or []
            prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
            text = f"echo: {prompt}"[:200]
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(text.split()),
                "total_tokens": len(prompt.split()) + len(text.split()),
            }
            model = request.get("model", "loopback")
            if request.get("stream"):
                self._chat_stream(model, text)
                return "200"
            self._send_json(200, {
                "id": f"chatcmpl-{random.getrandbits(48):x}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage,
            })  # fmt: skip
            return "200"

        def _chat_stream(self, model: str, text: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for word in text.split(" "):
                event = {"object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": word + " "}}]}  # fmt: skip
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _stream(self, chunks: int, size: int, delay: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for n in range(chunks):
                    self._chunk(str(n % 10).encode() * size)
                    time.sleep(delay)
                self._chunk(b"")
            except OSError:  # the reader went away mid-stream
                self.close_connection = True

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(body).encode(), "application/json", headers)

        def _send(
            self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _parsed(raw: bytes) -> Any:
    """A request body as JSON when it is JSON, else as text."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
