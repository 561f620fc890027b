"""The demo's worker processes.

Each worker is a spawned process with a database connection pool of its own. It
waits for ``start`` (set by the parent once every worker is ready, so that they
all begin together), then pulls work items from the shared queue until it takes
the stop marker (``None``), with a plain call before each of the first ones for
the latency baseline. It reports what happens, attempt by attempt, on the events
queue.
:func:`callindex_worker` records through callindex's audited clients;
:func:`legacy_worker` replays the same work the old way (see :mod:`.legacy`).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventFlag
from typing import Any, Final

import httpx

from callindex.clients import AuditedHTTPClient, AuditedLLMClient
from callindex.clients.transport import ATTEMPT_EXTENSION, OPERATION_EXTENSION
from callindex.demo.events import (
    AttemptEnded,
    AttemptStarted,
    Baseline,
    Crashed,
    Event,
    Finished,
    ItemDone,
    ItemFailed,
    Kind,
    Ready,
    WorkItem,
    kind_of,
)
from callindex.demo.legacy import LegacyCounters, LegacyStore
from callindex.errors import CallIndexError
from callindex.recorder import CallRecorder
from callindex.retry import RETRY_STATUSES, RetryPolicy, retry_after_seconds

MODEL: Final = "loopback-mini"
BASELINE_CALLS: Final = 8  # plain calls of each kind per worker
TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)


def http_transport() -> httpx.HTTPTransport:
    """A connection per request. The loopback server sends a response's headers and
    body as two writes without TCP_NODELAY, so on a kept-alive connection each
    response waits ~40 ms for the client's delayed ACK; a new connection is ACKed
    at once. Plain and audited calls alike use this, so the comparison stays fair."""
    return httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))


@dataclass(frozen=True)
class Flags:
    """Set by the parent: ``start`` when every worker is ready, ``baseline_over``
    when the plain calls must stop (before a request is held for ``--kill-one``),
    ``stop`` to end the work early (Ctrl-C)."""

    start: EventFlag
    baseline_over: EventFlag
    stop: EventFlag

    def next_item(self, work: Queue[WorkItem | None]) -> WorkItem | None:
        """The next work item, or ``None`` when the work is over."""
        return None if self.stop.is_set() else work.get()


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to know; ``url`` is the database (callindex's, or the
    legacy table's), ``slow_ms`` the latency above which a reply counts as
    slowed on purpose by the server."""

    worker: int
    url: str
    api_url: str
    retry: RetryPolicy
    slow_ms: float
    legacy_table: str = ""


class ReportingTransport(httpx.BaseTransport):
    """The real HTTP transport, shared by all clients of a worker, reporting each
    request to the parent as it starts and ends.

    Under an :class:`~callindex.AuditedTransport` it sees the request after its
    ``pending`` row is committed, with the attempt number and operation id
    callindex records.
    """

    def __init__(self, config: WorkerConfig, events: Queue[Event]) -> None:
        self._inner = http_transport()
        self._config = config
        self._events = events
        self.begin_item("", 0)

    def begin_item(self, state_id: str, n: int) -> None:
        self.state_id, self.n, self.kind = state_id, n, kind_of(n)
        self.attempts = 0
        self.operation_id: str | None = None
        self.slowed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        extensions = request.extensions
        self.attempts = int(extensions.get(ATTEMPT_EXTENSION, self.attempts + 1))
        if OPERATION_EXTENSION in extensions:
            self.operation_id = str(extensions[OPERATION_EXTENSION])
        worker = self._config.worker
        self._events.put(
            AttemptStarted(
                worker, self.state_id, self.n, self.kind, self.attempts, time.monotonic()
            )
        )
        started = time.perf_counter()
        try:
            response = self._inner.handle_request(request)
        except Exception:
            self._events.put(AttemptEnded(worker, self.state_id, ok=False))
            raise
        if (time.perf_counter() - started) * 1000 >= self._config.slow_ms:
            self.slowed = True
        self._events.put(AttemptEnded(worker, self.state_id, response.is_success))
        return response

    def close(self) -> None:
        """Clients come and go per call; the connection pool stays until :meth:`shutdown`."""

    def shutdown(self) -> None:
        self._inner.close()


def callindex_worker(
    config: WorkerConfig, work: Queue[WorkItem | None], events: Queue[Event], flags: Flags
) -> None:
    """Process entry point: make each call through an audited client of its state."""
    _quiet_process()
    try:
        transport = ReportingTransport(config, events)
        with CallRecorder(config.url) as recorder:
            events.put(Ready(config.worker, os.getpid()))
            flags.start.wait()
            baseline = BaselineSampler(config, events, flags.baseline_over)
            while (item := flags.next_item(work)) is not None:
                baseline.sample()
                events.put(_audited_call(recorder, transport, config, *item))
            baseline.report()
        transport.shutdown()
    except Exception as error:
        events.put(Crashed(config.worker, f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None
    events.put(Finished(config.worker))


def _audited_call(
    recorder: CallRecorder,
    transport: ReportingTransport,
    config: WorkerConfig,
    state_id: str,
    n: int,
) -> ItemDone | ItemFailed:
    transport.begin_item(state_id, n)
    kind = kind_of(n)
    started = time.perf_counter()
    try:
        ok = _send_audited(recorder, transport, config, state_id, n, kind)
    except CallIndexError as error:
        return ItemFailed(config.worker, state_id, n, f"{type(error).__name__}: {error}")
    latency_ms = (time.perf_counter() - started) * 1000
    clean = ok and transport.attempts == 1 and not transport.slowed
    return ItemDone(
        config.worker,
        state_id,
        n,
        kind,
        transport.operation_id or "",
        transport.attempts,
        ok,
        latency_ms if clean else None,
    )


def _send_audited(
    recorder: CallRecorder,
    transport: ReportingTransport,
    config: WorkerConfig,
    state_id: str,
    n: int,
    kind: Kind,
) -> bool:
    """One logical call, with retries; ``True`` when its last attempt succeeded."""
    try:
        if kind == "http":
            with AuditedHTTPClient(
                recorder,
                state_id,
                base_url=config.api_url,
                retry=config.retry,
                timeout=TIMEOUT,
                inner=transport,
            ) as http:
                return http.get(f"/items/{n}").is_success
        with AuditedLLMClient(
            recorder,
            state_id,
            base_url=f"{config.api_url}/v1",
            model=MODEL,
            retry=config.retry,
            timeout=TIMEOUT,
            inner=transport,
        ) as llm:
            llm.chat(_messages(state_id, n), temperature=0)
            return True
    except (httpx.TransportError, httpx.HTTPStatusError):
        return False


def legacy_worker(
    config: WorkerConfig, work: Queue[WorkItem | None], events: Queue[Event], flags: Flags
) -> None:
    """Process entry point: the same calls, recorded the old way."""
    _quiet_process()
    try:
        store = LegacyStore(config.url, config.legacy_table)
        engine = store.engine()
        counters = LegacyCounters(lambda state_id: store.seed(engine, state_id))
        transport = ReportingTransport(config, events)
        with httpx.Client(
            base_url=config.api_url, transport=transport, timeout=TIMEOUT, trust_env=False
        ) as client:
            events.put(Ready(config.worker, os.getpid()))
            flags.start.wait()
            baseline = BaselineSampler(config, events, flags.baseline_over)
            while (item := flags.next_item(work)) is not None:
                baseline.sample()
                state_id, n = item
                transport.begin_item(state_id, n)
                kind = kind_of(n)
                operation_id = str(uuid.uuid4())
                started = time.perf_counter()
                ok = _send_legacy(client, config.retry, state_id, n, kind)
                written = store.insert(
                    engine,
                    state_id=state_id,
                    call_index=counters.next_index(state_id),
                    call_type=kind,
                    status="success" if ok else "error",
                    operation_id=operation_id,
                    attempts=transport.attempts,
                    request={"n": n, "kind": kind},
                )
                latency_ms = (time.perf_counter() - started) * 1000
                clean = ok and written and transport.attempts == 1 and not transport.slowed
                events.put(
                    ItemDone(
                        config.worker,
                        state_id,
                        n,
                        kind,
                        operation_id,
                        transport.attempts,
                        ok,
                        latency_ms if clean else None,
                        write_refused=not written,
                    )
                )
            baseline.report()
        transport.shutdown()
        engine.dispose()
    except Exception as error:
        events.put(Crashed(config.worker, f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None
    events.put(Finished(config.worker))


def _send_legacy(
    client: httpx.Client, policy: RetryPolicy, state_id: str, n: int, kind: Kind
) -> bool:
    """The old client's retry loop: the same statuses, waits and attempt budget."""
    for attempt in range(1, policy.max_attempts + 1):
        last = attempt == policy.max_attempts
        try:
            response = _plain_call(client, state_id, n, kind)
        except httpx.TransportError:
            if last:
                return False
            time.sleep(_backoff(policy, attempt))
            continue
        if response.status_code not in RETRY_STATUSES or last:
            return response.is_success
        asked = retry_after_seconds(response.headers)
        time.sleep(
            min(asked, policy.max_retry_after) if asked is not None else _backoff(policy, attempt)
        )
    return False


def _backoff(policy: RetryPolicy, attempt: int) -> float:
    return random.uniform(0, min(policy.max_wait, policy.initial_wait * 2**attempt))


def _plain_call(client: httpx.Client, state_id: str, n: int, kind: Kind) -> httpx.Response:
    if kind == "http":
        return client.get(f"/items/{n}")
    body: dict[str, Any] = {"model": MODEL, "messages": _messages(state_id, n), "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    if response.is_success:
        response.json()
    return response


class BaselineSampler:
    """Plain, unaudited calls to the same server, one before each work item, until
    there are :data:`BASELINE_CALLS` of each kind or the parent says enough
    (``over``); their latencies are the yardstick of the added latency. Made
    between the work items, they meet the load the audited calls meet."""

    def __init__(self, config: WorkerConfig, events: Queue[Event], over: EventFlag) -> None:
        self._config = config
        self._events = events
        self._over = over
        self._samples: dict[str, list[float]] = {"http": [], "llm": []}
        self._made = 0
        self._reported = False
        self._client = httpx.Client(
            base_url=config.api_url, transport=http_transport(), timeout=TIMEOUT, trust_env=False
        )

    def sample(self) -> None:
        if self._reported:
            return
        enough = all(len(values) >= BASELINE_CALLS for values in self._samples.values())
        if enough or self._over.is_set() or self._made >= 4 * BASELINE_CALLS:
            self.report()
            return
        kind = kind_of(self._made)
        self._made += 1
        started = time.perf_counter()
        try:
            response = _plain_call(self._client, "baseline", self._made, kind)
        except httpx.TransportError:
            return
        latency_ms = (time.perf_counter() - started) * 1000
        if response.is_success and latency_ms < self._config.slow_ms:
            self._samples[kind].append(latency_ms)

    def report(self) -> None:
        """Send the samples to the parent, once, and stop sampling."""
        if not self._reported:
            self._reported = True
            self._client.close()
            self._events.put(Baseline(self._config.worker, self._samples))


def _messages(state_id: str, n: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Summarise call {n} of {state_id}"}]


def _quiet_process() -> None:
    """Leave Ctrl-C to the parent, and keep retry warnings off the terminal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("callindex").addHandler(logging.NullHandler())
