"""HTTP bodies as audit payloads: JSON when they are JSON, else text, else
base64; capped in size, with the original length and hash kept."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Final

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
            parsed, ok = _json(head)
            if ok:
                record["json"] = parsed
                return record
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


def _json(content: bytes) -> tuple[Any, bool]:
    try:
        value = json.loads(content)
        # JSON may spell NUL or a lone surrogate as an escape: PostgreSQL's
        # JSONB cannot store either, so such a body is kept as text instead.
        encoded = json.dumps(value, ensure_ascii=False)
        encoded.encode("utf-8")
    except (ValueError, UnicodeError):
        return None, False
    return value, "\\u0000" not in encoded


def _text(content: bytes, *, truncated: bool) -> str | None:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        # A cut may split the last character; anything else is binary.
        if not (truncated and error.start >= len(content) - 3):
            return None
        text = content[: error.start].decode("utf-8")
    return None if "\x00" in text else text
