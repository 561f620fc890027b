"""Durations for `sweep --older-than` and `verify --pending-older-than`."""

from __future__ import annotations

import pytest

from callindex import InvalidInputError
from callindex.audit import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("0s", 0),
        ("250ms", 0.25),
        ("1.5h", 5400),
        (" 2H ", 7200),
    ],
)
def test_parses(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "15", "-5m", "1x", "m15", "1h 30m", "1e3s"])
def test_refuses(text: str) -> None:
    with pytest.raises(InvalidInputError, match="not a duration"):
        parse_duration(text)
