"""HTTP bodies as audit payloads: JSON when they are JSON, else text, else
base64; capped in size, with the original length and hash kept."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Final

from callindex import payloads
from callindex.errors import InvalidPayloadError

MAX_BODY_BYTES: Final = 256 * 1024


class BodyTap:
    """Collects a body as it passes: its first ``MAX_BODY_BYTES`` bytes, its
    length and its SHA-256, without holding more than the kept part."""

    def __init__(self, content: bytes = b"") -> None:
        self._head = bytearray()
        self._hash = hashlib.sha256()
        self.length = 0
        self.feed(content)

    def feed(self, chunk: bytes) -> None:
        if room := MAX_BODY_BYTES - len(self._head):
            self._head += chunk[:room]
        self._hash.update(chunk)
        self.length += len(chunk)

    def record(self, content_type: str | None, *, complete: bool = True) -> dict[str, Any] | None:
        """The body for the trail; ``None`` for an empty complete body.

        ``complete=False`` marks a streamed body the consumer stopped reading
        early (or that broke off): only the bytes seen are described.
        """
        if not self.length and complete:
            return None
        head = bytes(self._head)
        truncated = self.length > len(head)
        record: dict[str, Any] = {"length": self.length}
        if content_type:
            record["content_type"] = content_type
        if not complete:
            record["incomplete"] = True
        if truncated:
            record["truncated"] = True
            record["sha256"] = self._hash.hexdigest()
        elif complete and _looks_like_json(content_type, head):
            parsed, unstorable = _json(head)
            if unstorable is None and parsed is not _NOT_JSON:
                record["json"] = parsed
                return record
            if unstorable is not None:
                record["note"] = f"JSON kept as text: {unstorable}"
        text = _text(head, truncated=truncated or not complete)
        if text is not None:
            record["text"] = text
        else:
            record["base64"] = base64.b64encode(head).decode("ascii")
        return record


def _looks_like_json(content_type: str | None, content: bytes) -> bool:
    if content_type and "json" in content_type.lower():
        return True
    return content.lstrip()[:1] in (b"{", b"[")


_NOT_JSON: Final = object()


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotFinite(name)


def _json(content: bytes) -> tuple[Any, str | None]:
    """The parsed body, or why a body that parses cannot be stored as JSON
    (``_NOT_JSON`` and ``None`` when it is not JSON at all)."""
    try:
        value = json.loads(content, parse_constant=_refuse_constant)
    except _NotFinite as error:
        return _NOT_JSON, f"{error} is not a number JSON can store"
    except RecursionError:
        return _NOT_JSON, "nested too deeply to parse"
    except (ValueError, UnicodeError):
        return _NOT_JSON, None
    try:
        # What the trail refuses (NUL or a lone surrogate spelled as an
        # escape, nesting past its limit) is kept as text instead.
        payloads.prepare("body", value)
    except InvalidPayloadError as error:
        return _NOT_JSON, str(error).removeprefix("body ")
    return value, None


def _text(content: bytes, *, truncated: bool) -> str | None:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        # A cut may split the last character; anything else is binary.
        if not (truncated and error.start >= len(content) - 3):
            return None
        text = content[: error.start].decode("utf-8")
    return None if "\x00" in text else text
