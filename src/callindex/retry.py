"""Retry policies, built from tenacity's composable pieces.

:class:`DatabaseRetryPolicy` is the only place callindex retries database
work. It retries what a new attempt can fix (a lost connection, a server
restarting, a lock or busy timeout, a serialization failure, a deadlock) and
nothing else: a unique violation on ``(state_id, call_index)`` is reported at
once as :class:`~callindex.errors.CounterBehindError`. Every write it retries
is idempotent (allocation excepted, which may then leave a gap, never a
duplicate), so an ambiguous failure at commit is safe to repeat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from callindex.errors import ContentionError, DatabaseUnavailableError, InvalidInputError

T = TypeVar("T")

logger = logging.getLogger("callindex.retry")


@dataclass(frozen=True)
class DatabaseRetryPolicy:
    """How long callindex keeps trying a database operation before raising.

    Waits grow exponentially with full jitter from ``initial_wait`` up to
    ``max_wait`` seconds; it gives up after ``max_attempts`` attempts or
    ``max_seconds`` seconds, whichever comes first, and raises the last
    :class:`DatabaseUnavailableError` or :class:`ContentionError`. Each retry
    is logged at WARNING on the ``callindex.retry`` logger before it sleeps.
    """

    max_attempts: int = 12
    max_seconds: float = 60.0
    initial_wait: float = 0.05
    max_wait: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_seconds < 0:
            raise InvalidInputError("max_attempts must be >= 1 and max_seconds >= 0")
        if not 0 < self.initial_wait <= self.max_wait:
            raise InvalidInputError("need 0 < initial_wait <= max_wait")

    def call(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` until it succeeds or the policy gives up."""
        retrying = Retrying(
            retry=retry_if_exception_type((DatabaseUnavailableError, ContentionError)),
            wait=wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait),
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.max_seconds),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        )
        return retrying(operation)


NO_RETRY = DatabaseRetryPolicy(max_attempts=1, max_seconds=0)
