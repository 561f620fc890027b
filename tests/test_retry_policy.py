"""The HTTP retry policy and the redactor, piece by piece."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from tenacity import RetryCallState

from callindex import InvalidInputError, Redactor, RetryPolicy
from callindex.redaction import is_sensitive
from callindex.retry import RETRY_STATUSES, RetryableResponse, retry_after_seconds

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-4"}, 0.0),
        ({"Retry-After": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0),
        ({"Retry-After": format_datetime(NOW - timedelta(seconds=30), usegmt=True)}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "whenever"}, None),
        ({}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "-inf"}, None),
        ({"retry-after-ms": "nan", "Retry-After": "2"}, 2.0),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "-1e309"}, None),
        ({"Retry-After": "1e400"}, None),
        ({"Retry-After": "Fri, 31 Dec 99999 23:59:59 GMT"}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_seconds(httpx.Headers(headers), now=NOW) == seconds


@pytest.mark.parametrize("asked", ["nan", "inf", "-5", "1e300", "99999999"])
def test_a_hostile_retry_after_never_reaches_sleep_unbounded(asked: str) -> None:
    """What the wait gives tenacity's sleep is a finite number within the cap."""
    policy = RetryPolicy(max_retry_after=2.0, initial_wait=0.1, max_wait=0.5)
    wait = policy.tenacity_arguments()["wait"]
    response = httpx.Response(429, headers={"Retry-After": asked})
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = 1
    state.set_exception((RetryableResponse, RetryableResponse(response), None))
    waited = wait(state)
    assert math.isfinite(waited) and 0 <= waited <= 2.0


def test_retried_statuses() -> None:
    assert {408, 409, 429, 500, 502, 503, 504, 599} <= RETRY_STATUSES
    assert not {200, 201, 301, 400, 401, 403, 404, 422} & RETRY_STATUSES


@pytest.mark.parametrize(
    ("method", "extensions", "policy", "allowed"),
    [
        ("GET", {}, RetryPolicy(), True),
        ("PUT", {}, RetryPolicy(), True),
        ("POST", {}, RetryPolicy(), False),
        ("PATCH", {}, RetryPolicy(), False),
        ("POST", {"callindex.retry_safe": True}, RetryPolicy(), True),
        ("GET", {"callindex.retry_safe": False}, RetryPolicy(), False),
        ("POST", {}, RetryPolicy(retry_unsafe_methods=True), True),
    ],
)
def test_which_requests_may_be_repeated(
    method: str, extensions: dict[str, bool], policy: RetryPolicy, allowed: bool
) -> None:
    request = httpx.Request(method, "http://127.0.0.1/x", extensions=extensions)
    assert policy.allows(request) is allowed


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_attempts": 0},
        {"max_seconds": -1},
        {"initial_wait": 0},
        {"initial_wait": 5, "max_wait": 1},
    ],
)
def test_a_nonsensical_policy_is_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(InvalidInputError):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "sensitive"),
    [
        ("Authorization", True), ("Proxy-Authorization", True), ("Cookie", True),
        ("Set-Cookie", True), ("X-API-Key", True), ("api-key", True), ("X-Auth-Token", True),
        ("x-client-secret", True), ("api_key", True), ("token", True), ("key", True),
        ("Content-Type", False), ("Accept", False), ("page", False), ("model", False),
    ],
)  # fmt: skip
def test_sensitive_names(name: str, sensitive: bool) -> None:
    assert is_sensitive(name) is sensitive


def test_the_redactor_replaces_userinfo_and_sensitive_query_values() -> None:
    redactor = Redactor(key=b"k")
    url = redactor.url("https://user:pw@example.test/a?api_key=s3cret&page=2&token=t0k")
    assert "s3cret" not in url and "t0k" not in url and "user:pw" not in url
    assert "page=2" in url
    assert redactor.fingerprint("s3cret") in httpx.URL(url).params["api_key"]
    assert Redactor(key=None).url("https://u:p@h.test/?key=1") == (
        "https://[redacted]@h.test/?key=[redacted]"
    )


def test_secrets_are_scrubbed_from_free_text() -> None:
    redactor = Redactor(key=None)
    secrets = redactor.secrets_in(
        "http://alice:pa55word@h.test/?token=abcd1234", [("Authorization", "Bearer xyz-9876")]
    )
    scrubbed = redactor.scrub("failed for alice:pa55word token=abcd1234 Bearer xyz-9876", secrets)
    assert all(s not in scrubbed for s in ("pa55word", "abcd1234", "xyz-9876"))
