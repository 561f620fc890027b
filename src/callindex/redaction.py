"""Keeping secrets out of the audit trail.

Sensitive header values, URL userinfo and sensitive query parameters are
replaced by an HMAC-SHA256 fingerprint keyed by a secret the deployment
provides (so two records can be compared without either holding the secret),
or dropped when no key is configured. Raw values are never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

KEY_ENVIRONMENT_VARIABLE: Final = "CALLINDEX_REDACTION_KEY"
DROPPED: Final = "[redacted]"

SENSITIVE_NAMES: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "api_key",
        "apikey",
        "key",
        "token",
        "access_token",
        "password",
        "passwd",
        "sig",
        "signature",
    }
)
SENSITIVE_FRAGMENTS: Final = ("token", "secret", "key", "auth", "password", "session")


def is_sensitive(name: str) -> bool:
    """Whether a header or query parameter named ``name`` may carry a secret."""
    lowered = name.lower()
    return lowered in SENSITIVE_NAMES or any(f in lowered for f in SENSITIVE_FRAGMENTS)


@dataclass(frozen=True)
class Redactor:
    """Replaces secrets with fingerprints (``hmac-sha256:<hex>``) or drops them.

    ``key`` defaults to the ``CALLINDEX_REDACTION_KEY`` environment variable;
    without a key every secret becomes ``[redacted]``.
    """

    key: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls) -> Redactor:
        key = os.environ.get(KEY_ENVIRONMENT_VARIABLE)
        return cls(key.encode() if key else None)

    def fingerprint(self, value: str) -> str:
        if self.key is None:
            return DROPPED
        digest = hmac.new(self.key, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return f"hmac-sha256:{digest.hexdigest()}"

    def headers(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Headers as a dict (repeated names joined with ``, ``), secrets replaced."""
        merged: dict[str, list[str]] = {}
        for name, value in headers:
            merged.setdefault(name.lower(), []).append(value)
        return {
            name: self.fingerprint(", ".join(values)) if is_sensitive(name) else ", ".join(values)
            for name, values in merged.items()
        }

    def url(self, url: str) -> str:
        """``url`` with its userinfo and sensitive query values replaced."""
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{self.fingerprint(userinfo)}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, self.fingerprint(v) if is_sensitive(k) else v) for k, v in pairs]
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    @staticmethod
    def secrets_in(url: str, headers: Iterable[tuple[str, str]]) -> list[str]:
        """The raw secret values in a request, to scrub from free text such as errors."""
        parts = urlsplit(url)
        found = [v for k, v in headers if is_sensitive(k)]
        if "@" in parts.netloc:
            userinfo = parts.netloc.rpartition("@")[0]
            found += [userinfo, *userinfo.split(":", 1)]
        found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if is_sensitive(k)]
        # Longest first, so a secret that contains another is removed whole.
        return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str, secrets: Iterable[str]) -> str:
        for secret in secrets:
            text = text.replace(secret, self.fingerprint(secret))
        return text
