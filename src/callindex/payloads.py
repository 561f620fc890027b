"""Payloads: validated, canonical JSON and its SHA-256.

The canonical form is RFC 8785, the JSON Canonicalization Scheme, computed
with the ``rfc8785`` package: what is stored is that text, and its hash is
SHA-256 over its UTF-8 bytes, so anyone can recompute it in any language
(the upstream framework hashes the same way). JCS numbers are IEEE doubles,
so integers beyond ±(2**53 - 1) are refused: pass such ids as strings.

Rows recorded before 0.2 carry :data:`LEGACY_SCHEME` (sorted-key
``json.dumps``); :func:`recompute` checks each by its own scheme.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final

import rfc8785

from callindex.errors import InvalidPayloadError, PayloadTooLargeError

SCHEME: Final = "rfc8785"
LEGACY_SCHEME: Final = "sorted-json"
HASH_SCHEMES: Final = (SCHEME, LEGACY_SCHEME)
SAFE_INTEGER: Final = 2**53 - 1
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


JSON_NULL: Final = Payload(text="null", sha256=hashlib.sha256(b"null").hexdigest())


def canonical_json(value: Any) -> str:
    """The RFC 8785 text of ``value``; :class:`InvalidPayloadError` for what
    JCS cannot represent (NaN, infinities, integers beyond ±(2**53 - 1),
    non-JSON types)."""
    try:
        return rfc8785.dumps(value).decode("utf-8")
    except rfc8785.IntegerDomainError as error:
        raise InvalidPayloadError(
            "holds an integer beyond ±(2**53 - 1): JSON numbers are doubles "
            "(RFC 8785); store it as a string"
        ) from error
    except rfc8785.FloatDomainError as error:
        raise InvalidPayloadError(
            "holds NaN or an infinity, which JSON cannot represent"
        ) from error
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as error:
        if "UTF-8" in str(error) or isinstance(error, UnicodeError):
            raise InvalidPayloadError("contains a lone surrogate (invalid Unicode)") from error
        raise InvalidPayloadError(f"is not JSON-serialisable: {error}") from error


def legacy_json(value: Any) -> str:
    """The canonical text of :data:`LEGACY_SCHEME` (before 0.2)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def parse_stored(text: str) -> Any:
    """A stored payload parsed as RFC 8785 reads it: numbers are doubles, so an
    integer beyond ±(2**53 - 1) (a double JCS wrote in full) comes back a float."""
    return json.loads(text, parse_int=_json_integer)


def _json_integer(digits: str) -> int | float:
    number = int(digits)
    return number if abs(number) <= SAFE_INTEGER else float(digits)


def recompute(scheme: str, stored: str | int | float) -> str:
    """The hash of a stored payload, by the scheme its row was recorded with.

    ``rfc8785``: SHA-256 of the text exactly as stored (it was stored in its
    canonical form, so any edit, even of spacing or number spelling, shows);
    a top-level number SQLite stored as a number is canonicalised first.
    ``sorted-json`` (before 0.2): SHA-256 of the stored JSON parsed and
    written again with sorted keys.
    """
    if scheme == SCHEME:
        canonical = stored.encode("utf-8") if isinstance(stored, str) else rfc8785.dumps(stored)
    elif scheme == LEGACY_SCHEME:
        value = json.loads(stored) if isinstance(stored, str) else stored
        canonical = legacy_json(value).encode("utf-8")
    else:
        raise InvalidPayloadError(f"unknown hash scheme {scheme!r}; known: {HASH_SCHEMES}")
    return hashlib.sha256(canonical).hexdigest()


def prepare(name: str, value: Any) -> Payload | None:
    """Validate ``value`` and return it as a :class:`Payload`; ``None`` stays ``None``.

    Refused with :class:`InvalidPayloadError`: values JSON cannot represent
    (sets, bytes, objects, NaN, non-string keys, integers beyond
    ±(2**53 - 1)), NUL characters (PostgreSQL
    cannot read them as text, so SQLite refuses them too), lone surrogates,
    nesting deeper than 64; with :class:`PayloadTooLargeError`: canonical JSON
    over ``MAX_PAYLOAD_BYTES``.
    """
    if value is None:
        return None
    if isinstance(value, dict | list | tuple):
        _check_depth(name, value, depth=0)
    try:
        text = canonical_json(value)
    except InvalidPayloadError as error:
        raise InvalidPayloadError(f"{name} {error}") from error.__cause__
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise InvalidPayloadError(f"{name} contains a NUL character")
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"{name} is {len(encoded):,} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES:,}"
        )
    return Payload(text=text, sha256=hashlib.sha256(encoded).hexdigest())


def prepare_request(value: Any) -> Payload:
    """:func:`prepare` for a request, which always has a payload: ``None`` is
    recorded as JSON ``null``, with its hash (so ``request_hash`` is never
    empty, as schemes that declare it NOT NULL require)."""
    return prepare("request", value) or JSON_NULL


def _check_depth(name: str, value: Any, depth: int) -> None:
    """Refuse nesting deeper than ``_MAX_DEPTH``, visiting containers only."""
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        if depth + 1 > _MAX_DEPTH:
            raise InvalidPayloadError(f"{name} is nested deeper than {_MAX_DEPTH} levels")
        if isinstance(item, dict | list | tuple):
            _check_depth(name, item, depth + 1)
