"""Payloads: validated, canonical JSON and its SHA-256.

The canonical form is ``json.dumps`` with sorted keys, no whitespace and UTF-8
(not ASCII escapes). RFC 8785 (JCS) was considered and rejected: it refuses
integers beyond 2**53, which real API responses carry (64-bit ids).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from callindex.errors import InvalidPayloadError, PayloadTooLargeError

MAX_PAYLOAD_BYTES: Final = 1024 * 1024
_MAX_DEPTH: Final = 64
# json.dumps writes a NUL character as \u0000; an even run of backslashes
# before it means the text held a literal backslash-u instead.
_ESCAPED_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True, slots=True)
class Payload:
    """A payload ready to store: its canonical JSON text and that text's SHA-256."""

    text: str
    sha256: str


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (no validation beyond ``json``'s)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def prepare(name: str, value: Any) -> Payload | None:
    """Validate ``value`` and return it as a :class:`Payload`; ``None`` stays ``None``.

    Refused with :class:`InvalidPayloadError`: values JSON cannot represent
    (sets, bytes, objects, NaN, non-string keys), NUL characters (PostgreSQL's
    JSONB cannot store them, so SQLite refuses them too), lone surrogates,
    nesting deeper than 64; with :class:`PayloadTooLargeError`: canonical JSON
    over ``MAX_PAYLOAD_BYTES``.
    """
    if value is None:
        return None
    if isinstance(value, dict | list | tuple):
        _check_depth(name, value, depth=0)
    try:
        text = canonical_json(value)
    except (TypeError, ValueError) as error:
        raise InvalidPayloadError(f"{name} is not JSON-serialisable: {error}") from error
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise InvalidPayloadError(f"{name} contains a NUL character")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidPayloadError(
            f"{name} contains a lone surrogate (invalid Unicode) at character {error.start}"
        ) from error
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"{name} is {len(encoded):,} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES:,}"
        )
    return Payload(text=text, sha256=hashlib.sha256(encoded).hexdigest())


def _check_depth(name: str, value: Any, depth: int) -> None:
    """Refuse nesting deeper than ``_MAX_DEPTH``, visiting containers only."""
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        if depth + 1 > _MAX_DEPTH:
            raise InvalidPayloadError(f"{name} is nested deeper than {_MAX_DEPTH} levels")
        if isinstance(item, dict | list | tuple):
            _check_depth(name, item, depth + 1)
