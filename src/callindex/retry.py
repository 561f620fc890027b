"""Retry policies, built from tenacity's composable pieces: one for database
work (:class:`DatabaseRetryPolicy`), one for the audited HTTP and LLM clients
(:class:`RetryPolicy`).

:class:`DatabaseRetryPolicy` is the only place callindex retries database
work. It retries what a new attempt can fix (a lost connection, a server
restarting, a lock or busy timeout, a serialization failure, a deadlock) and
nothing else: a unique violation on ``(state_id, call_index)`` is reported at
once as :class:`~callindex.errors.CounterBehindError`. Every write it retries
is idempotent (allocation excepted, which may then leave a gap, never a
duplicate), so an ambiguous failure at commit is safe to repeat.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from callindex.errors import ContentionError, DatabaseUnavailableError, InvalidInputError

T = TypeVar("T")

logger = logging.getLogger("callindex.retry")
_RETRYABLE: Final = (DatabaseUnavailableError, ContentionError)


@dataclass(frozen=True)
class DatabaseRetryPolicy:
    """How long callindex keeps trying a database operation before raising.

    Waits grow exponentially with full jitter from ``initial_wait`` up to
    ``max_wait`` seconds; it gives up after ``max_attempts`` attempts or
    ``max_seconds`` seconds, whichever comes first, and raises the last
    :class:`DatabaseUnavailableError` or :class:`ContentionError`. Each retry
    is logged at WARNING on the ``callindex.retry`` logger before it sleeps.

    No attempt waits without a bound: ``attempt_timeout`` seconds (at most
    ``max_seconds``) bound each attempt's lock waits (PostgreSQL
    ``lock_timeout``, SQLite's busy timeout) and the wait for a free pooled
    connection; twice that bounds a statement (``statement_timeout``). An
    attempt that hits a bound fails with :class:`ContentionError` and is retried.
    """

    max_attempts: int = 12
    max_seconds: float = 60.0
    initial_wait: float = 0.05
    max_wait: float = 2.0
    attempt_timeout: float = 10.0

    def __post_init__(self) -> None:
        _check_limits(self.max_attempts, self.max_seconds, self.initial_wait, self.max_wait)
        if not _number(self.attempt_timeout) or not 0 < self.attempt_timeout < math.inf:
            raise InvalidInputError(
                f"attempt_timeout must be a number of seconds > 0, not {self.attempt_timeout!r}"
            )

    @property
    def attempt_seconds(self) -> float:
        """How long one attempt may wait or run: ``attempt_timeout``, at most ``max_seconds``."""
        return max(min(self.attempt_timeout, self.max_seconds), 0.001)

    def call(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` until it succeeds or the policy gives up.

        The first attempt runs outside tenacity (the hot path pays nothing for
        the retry machinery); after a retryable failure it is logged, the first
        wait is slept, and tenacity runs the remaining attempts.
        """
        started = time.monotonic()
        try:
            return operation()
        except _RETRYABLE as error:
            time.sleep(self._first_wait(error, started))
        result: T = self._retrying.copy(stop=self._stop_after_first(started))(operation)
        return result

    async def call_async(self, operation: Callable[[], Awaitable[T]]) -> T:
        """:meth:`call` for a coroutine function: the same attempts, waits and
        logging, sleeping without blocking the event loop."""
        started = time.monotonic()
        try:
            return await operation()
        except _RETRYABLE as error:
            await asyncio.sleep(self._first_wait(error, started))
        retrying = AsyncRetrying(
            **{**self._tenacity_arguments, "stop": self._stop_after_first(started)}
        )
        result: T = await retrying(operation)
        return result

    def _first_wait(self, error: Exception, started: float) -> float:
        """The wait after a failed first attempt (logged), or ``error`` raised
        again when the policy allows no second one."""
        remaining = self.max_seconds - (time.monotonic() - started)
        if self.max_attempts == 1 or remaining <= 0:
            raise error
        wait = min(random.uniform(0, self.initial_wait), remaining)
        logger.warning(retry_line(wait, 2, self.max_attempts, str(error)))
        return wait

    def _stop_after_first(self, started: float) -> Any:
        # The policy's time counts from the first attempt.
        remaining = max(self.max_seconds - (time.monotonic() - started), 0.0)
        return stop_after_attempt(self.max_attempts - 1) | stop_after_delay(remaining)

    @functools.cached_property
    def _tenacity_arguments(self) -> dict[str, Any]:
        return {
            "retry": retry_if_exception_type(_RETRYABLE),
            "wait": wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait),
            "stop": stop_after_attempt(self.max_attempts - 1) | stop_after_delay(self.max_seconds),
            # Tenacity's attempt 1 is the policy's attempt 2 (the first ran outside).
            "before_sleep": log_retry(logger, self.max_attempts, first_attempt=2),
            "reraise": True,
        }

    @functools.cached_property
    def _retrying(self) -> Retrying:
        # Built once per policy: on the hot path its construction would cost
        # about as much as the statement. Its per-call state is thread-local.
        return Retrying(**self._tenacity_arguments)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_limits(max_attempts: int, max_seconds: float, initial: float, maximum: float) -> None:
    """The bounds both policies share, checked once for both."""
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise InvalidInputError(f"max_attempts must be an integer >= 1, not {max_attempts!r}")
    if not _number(max_seconds) or max_seconds < 0:
        raise InvalidInputError(f"max_seconds must be a number >= 0, not {max_seconds!r}")
    if not (_number(initial) and _number(maximum)) or not 0 < initial <= maximum:
        raise InvalidInputError("need numbers with 0 < initial_wait <= max_wait")


RETRY_STATUSES: Final = frozenset({408, 409, 429, *range(500, 600)})
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_SAFE_EXTENSION: Final = "callindex.retry_safe"

http_logger = logging.getLogger("callindex.http")


class RetryableResponse(Exception):
    """Raised inside the retry loop for a response worth another attempt."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def retry_after_seconds(headers: httpx.Headers, now: datetime | None = None) -> float | None:
    """The delay a response asks for: ``retry-after-ms``, else ``Retry-After`` in
    seconds or as an HTTP date; ``None`` when absent, unreadable or not a finite
    number (``nan``, ``inf``); a delay in the past is 0."""
    if (milliseconds := _finite(headers.get("retry-after-ms"))) is not None:
        return max(milliseconds / 1000, 0.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    if (seconds := _finite(value)) is not None:
        return max(seconds, 0.0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def _finite(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class wait_retry_after(wait_base):
    """Wait what the server asked for (capped), else fall back to ``fallback``."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, RetryableResponse):
            asked = retry_after_seconds(error.response.headers)
            if asked is not None:
                return min(asked, self.cap)
        return float(self.fallback(retry_state))


@dataclass(frozen=True)
class RetryPolicy:
    """When the audited clients repeat an HTTP request. Every attempt is
    recorded as a call of its own.

    Retried: 408, 409, 429 and 5xx responses and transport errors (connect
    errors, timeouts, dropped connections). The wait is what ``retry-after-ms``
    or ``Retry-After`` asks for, capped at ``max_retry_after``; otherwise
    exponential backoff with full jitter between ``initial_wait`` and
    ``max_wait``. Bounded by ``max_attempts`` and ``max_seconds``. Requests
    with a non-idempotent method (POST, PATCH) are retried only when
    ``retry_unsafe_methods`` is set or the request carries the extension
    ``{"callindex.retry_safe": True}``. When the attempts run out on a
    retryable status, the last response is returned as it is.
    """

    max_attempts: int = 4
    max_seconds: float = 60.0
    initial_wait: float = 0.5
    max_wait: float = 10.0
    max_retry_after: float = 60.0
    retry_unsafe_methods: bool = False

    def __post_init__(self) -> None:
        _check_limits(self.max_attempts, self.max_seconds, self.initial_wait, self.max_wait)
        if not _number(self.max_retry_after) or self.max_retry_after < 0:
            raise InvalidInputError("max_retry_after must be a number >= 0")

    def allows(self, request: httpx.Request) -> bool:
        """Whether ``request`` may be sent more than once."""
        marked = request.extensions.get(RETRY_SAFE_EXTENSION)
        if marked is not None:
            return bool(marked)
        return self.retry_unsafe_methods or request.method.upper() in IDEMPOTENT_METHODS

    def tenacity_arguments(self, redact: Callable[[str], str] = str) -> dict[str, Any]:
        """Arguments for tenacity's ``Retrying`` and ``AsyncRetrying`` alike;
        ``redact`` cleans the error text of the retry log line."""
        return {
            "retry": retry_if_exception_type((httpx.TransportError, RetryableResponse)),
            "wait": wait_retry_after(
                wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait),
                cap=self.max_retry_after,
            ),
            "stop": stop_after_attempt(self.max_attempts) | stop_after_delay(self.max_seconds),
            "before_sleep": log_retry(http_logger, self.max_attempts, redact=redact),
            "retry_error_callback": _last_response_or_raise,
        }


def retry_line(sleep: float, next_attempt: int, max_attempts: int, reason: str) -> str:
    """The one line logged before a retry:
    ``retrying in 0.4 s (2/12): cannot reach the database ...``."""
    lines = reason.strip().splitlines()
    return (
        f"retrying in {sleep:.1f} s ({next_attempt}/{max_attempts}): {lines[0] if lines else '?'}"
    )


def log_retry(
    logger: logging.Logger,
    max_attempts: int,
    *,
    first_attempt: int = 1,
    redact: Callable[[str], str] = str,
) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep`` that logs :func:`retry_line` at WARNING, the
    error text passed through ``redact`` first (it may quote a request's
    secrets). ``first_attempt`` is the number of tenacity's first attempt."""

    def log(retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        sleep = retry_state.next_action.sleep if retry_state.next_action else 0.0
        next_attempt = retry_state.attempt_number + first_attempt
        logger.warning(retry_line(sleep, next_attempt, max_attempts, redact(str(error))))

    return log


def _last_response_or_raise(retry_state: RetryCallState) -> httpx.Response:
    assert retry_state.outcome is not None
    error = retry_state.outcome.exception()
    if isinstance(error, RetryableResponse):
        return error.response
    assert error is not None
    raise error


NO_HTTP_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_HTTP_RETRY = RetryPolicy()
