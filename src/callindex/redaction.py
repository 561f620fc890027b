"""Keeping secrets out of the audit trail and the logs.

A :class:`Redactor` replaces every secret it can recognise with an
HMAC-SHA256 fingerprint keyed by a secret the deployment provides (so two
records can be compared without either holding the secret), or with
``[redacted]`` when no key is configured. What it recognises:

- headers, query and form parameters, ``;`` parameters and JSON fields whose
  name looks secret (:data:`SENSITIVE_NAMES`, :data:`SENSITIVE_FRAGMENTS`, and
  the deployment's own ``names``), at any depth of a JSON body;
- URL userinfo, and the parts of a URL path matched by the deployment's
  ``path_patterns`` (e.g. ``r"/bot([^/]+)/"``);
- URLs inside the response headers that carry them (``Location``,
  ``Content-Location``, ``Link``, ``Refresh``);
- anywhere in free text (error messages, text bodies, reason phrases): the
  values found above, and their derived forms (stripped, percent-encoded,
  escaped, without a ``Bearer``/``Basic`` prefix, a decoded Basic pair).

Raw values are never stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit, urlunsplit

from callindex.errors import InvalidHeaderError, InvalidInputError

KEY_ENVIRONMENT_VARIABLE: Final = "CALLINDEX_REDACTION_KEY"
DROPPED: Final = "[redacted]"

SENSITIVE_NAMES: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "code",
        "pass",
        "pwd",
        "sig",
        "assertion",
        "client_assertion",
    }
)
SENSITIVE_FRAGMENTS: Final = (
    "token",
    "secret",
    "key",
    "auth",
    "password",
    "passwd",
    "session",
    "credential",
    "signature",
    "jwt",
)
_TOKEN_COUNT: Final = re.compile(r"[a-z0-9_.-]+[_.-]tokens")
URL_HEADERS: Final = frozenset({"location", "content-location", "link", "refresh"})

_MIN_SECRET_LENGTH: Final = 4
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# name=value pairs of a query, a fragment or a path segment's ;parameters,
# whichever of & and ; separates them.
_PAIR: Final = re.compile(r"(?P<lead>^|[&;])(?P<name>[^=&;]*)=(?P<value>[^&;]*)")
_USERINFO: Final = re.compile(r"(?P<scheme>(?:[A-Za-z][A-Za-z0-9+.-]*:)?//)(?P<userinfo>[^/?#]*)@")
_QUERY_OR_FRAGMENT: Final = re.compile(r"([?#])")
_URL_IN_LINK: Final = re.compile(r"<([^>]*)>")
_URL_IN_REFRESH: Final = re.compile(r"(?i)(url\s*=\s*)(\S+)")
# The rest of a JSON string after its opening quote (possessive: one pass).
_STRING_REST: Final = re.compile(r'(?:[^"\\]|\\.)*+"', re.DOTALL)
_SCALAR: Final = re.compile(r"[^,}\]\s]*")
_AUTH_SCHEME: Final = re.compile(r"(?i)^\s*(?P<scheme>bearer|basic|token|digest)\s+(?P<rest>.+)$")


def is_sensitive(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether a header, parameter or field named ``name`` may carry a secret.

    Counts of tokens (``prompt_tokens``, ``max_tokens``, ``output_tokens``)
    hold numbers, not secrets, although their names hold "token"."""
    lowered = name.strip().lower()
    fragments = [f for f in SENSITIVE_FRAGMENTS if f in lowered]
    if fragments == ["token"] and _TOKEN_COUNT.fullmatch(lowered):
        fragments = []
    if lowered in SENSITIVE_NAMES or fragments:
        return True
    return any(lowered == e or e in lowered for e in extra)


def check_header_values(headers: Iterable[tuple[str, str]]) -> None:
    """Refuse header values holding a control character (a key read from a
    file with its trailing newline): HTTP forbids them, and the HTTP library's
    error would quote the value. The value itself is never quoted here."""
    for name, value in headers:
        if _CONTROL.search(value):
            raise InvalidHeaderError(
                f"the value of header {name!r} contains a control character "
                f"(a trailing newline?); strip it before passing it in. Nothing was sent."
            )


@dataclass(frozen=True)
class Redactor:
    """Replaces secrets with fingerprints (``hmac-sha256:<hex>``) or drops them.

    ``key`` defaults to the ``CALLINDEX_REDACTION_KEY`` environment variable;
    without a key every secret becomes ``[redacted]``. ``names`` adds names of
    headers, parameters and fields to treat as secret (matched like the
    built-in fragments: case-insensitive, anywhere in the name).
    ``path_patterns`` are regular expressions searched in URL paths: each
    group they capture (or the whole match, without groups) is a secret.
    """

    key: bytes | None = field(default=None, repr=False)
    names: tuple[str, ...] = ()
    path_patterns: tuple[re.Pattern[str], ...] = ()

    def __init__(
        self,
        key: bytes | None = None,
        *,
        names: Iterable[str] = (),
        path_patterns: Iterable[str | re.Pattern[str]] = (),
    ) -> None:
        if isinstance(names, str) or isinstance(path_patterns, str):
            raise InvalidInputError("names and path_patterns take a list, not one string")
        try:
            patterns = tuple(re.compile(p) for p in path_patterns)
        except re.error as error:
            raise InvalidInputError(
                f"a path pattern is not a regular expression: {error}"
            ) from error
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "names", tuple(n.strip().lower() for n in names if n.strip()))
        object.__setattr__(self, "path_patterns", patterns)

    @classmethod
    def from_environment(
        cls, *, names: Iterable[str] = (), path_patterns: Iterable[str | re.Pattern[str]] = ()
    ) -> Redactor:
        key = os.environ.get(KEY_ENVIRONMENT_VARIABLE)
        return cls(key.encode() if key else None, names=names, path_patterns=path_patterns)

    def is_sensitive(self, name: str) -> bool:
        return is_sensitive(name, self.names)

    def fingerprint(self, value: str) -> str:
        if self.key is None:
            return DROPPED
        digest = hmac.new(self.key, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return f"hmac-sha256:{digest.hexdigest()}"

    # Structured places

    def headers(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Headers as a dict (repeated names joined with ``, ``), secrets replaced
        and the URLs of ``Location``-like headers redacted."""
        merged: dict[str, list[str]] = {}
        for name, value in headers:
            merged.setdefault(name.lower(), []).append(value)
        redacted = {}
        for name, values in merged.items():
            value = ", ".join(values)
            if self.is_sensitive(name):
                value = self.fingerprint(value)
            elif name in URL_HEADERS:
                value = self._urls_in_header(name, value)
            redacted[name] = value
        return redacted

    def url(self, url: str) -> str:
        """``url`` with its userinfo, secret parameters (query, fragment and
        ``;`` parameters) and secret path parts replaced."""
        userinfo = ""
        if found := _USERINFO.match(url):
            userinfo = self.fingerprint(unquote_plus(found["userinfo"])) + "@"
            url = found["scheme"] + url[found.end() :]
        try:
            parts = urlsplit(url)
        except ValueError:  # not a URL Python can split (an invalid IPv6 host)
            head, *rest = _QUERY_OR_FRAGMENT.split(url)
            return self._unsplittable(userinfo, head, rest)
        netloc = userinfo + parts.netloc
        path = self._path(parts.path)
        return urlunsplit(
            (parts.scheme, netloc, path, self.pairs(parts.query), self.pairs(parts.fragment))
        )

    def _unsplittable(self, userinfo: str, head: str, rest: list[str]) -> str:
        """A URL urlsplit refuses: its query and fragment parameters redacted all
        the same, after its scheme and the userinfo's fingerprint."""
        scheme, slashes, location = head.partition("//")
        head = f"{scheme}{slashes}{userinfo}{location}" if slashes else userinfo + head
        parts = [head]
        for separator, piece in zip(rest[::2], rest[1::2], strict=True):
            parts += [separator, self.pairs(piece)]
        return self.text("".join(parts))

    def pairs(self, text: str) -> str:
        """``name=value`` pairs (a query string or a form body, separated by
        ``&`` or ``;``) with the values of secret names replaced; the rest is
        kept as it was written."""

        def replace(match: re.Match[str]) -> str:
            if not self.is_sensitive(unquote_plus(match["name"])):
                return match[0]
            return (
                f"{match['lead']}{match['name']}={self.fingerprint(unquote_plus(match['value']))}"
            )

        return _PAIR.sub(replace, text)

    def json(self, value: Any, secrets: Iterable[str] = ()) -> Any:
        """A parsed JSON value with the values of secret fields replaced at any
        depth (a secret field holding an object or array is replaced whole),
        and ``secrets`` scrubbed from every string."""
        known = list(secrets)
        if isinstance(value, dict):
            return {
                k: self.fingerprint(_as_text(v)) if self.is_sensitive(k) else self.json(v, known)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.json(item, known) for item in value]
        if isinstance(value, str) and known:
            return self.scrub(value, known)
        return value

    def text(self, text: str, secrets: Iterable[str] = (), *, form: bool = False) -> str:
        """Free text (a text body, JSON kept as text, an error message): secret
        members of any JSON in it, secret ``name=value`` pairs when ``form``, and
        ``secrets`` in all their derived forms, replaced."""

        pieces, done = [], 0
        for start, end in _secret_members(text, self.is_sensitive):
            secret = self.fingerprint(text[start:end].strip('"'))
            pieces += [text[done:start], f'"{secret}"']
            done = end
        text = "".join([*pieces, text[done:]])
        if form:
            text = self.pairs(text)
        return self.scrub(text, secrets)

    def body(
        self, record: dict[str, Any] | None, secrets: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """A body record (see :class:`~callindex.clients.bodies.BodyTap`) with its
        secrets replaced."""
        if record is None:
            return None
        known = list(secrets)
        redacted = dict(record)
        if "json" in redacted:
            redacted["json"] = self.json(redacted["json"], known)
        if "text" in redacted:
            form = "x-www-form-urlencoded" in str(redacted.get("content_type", "")).lower()
            redacted["text"] = self.text(redacted["text"], known, form=form)
        return redacted

    # Finding and scrubbing raw values

    def secrets_in(
        self,
        url: str,
        headers: Iterable[tuple[str, str]],
        body: dict[str, Any] | None = None,
    ) -> list[str]:
        """The raw secret values in a request (its URL, headers and body
        record), with their derived forms, to scrub from free text."""
        parts = urlsplit(url)
        found = [v for k, v in headers if self.is_sensitive(k)]
        if "@" in parts.netloc:
            userinfo = parts.netloc.rpartition("@")[0]
            found += [userinfo, *userinfo.split(":", 1)]
        for where in (parts.query, parts.fragment, parts.path):
            found += [
                m["value"]
                for m in _PAIR.finditer(where)
                if self.is_sensitive(unquote_plus(m["name"]))
            ]
        for pattern in self.path_patterns:
            for match in pattern.finditer(parts.path):
                found += list(match.groups()) or [match[0]]
        if body is not None:
            if "json" in body:
                found += _secret_leaves(body["json"], self.is_sensitive)
            if "text" in body:
                found += [
                    m["value"]
                    for m in _PAIR.finditer(body["text"])
                    if self.is_sensitive(unquote_plus(m["name"]))
                ]
        return _with_derived_forms(found)

    def scrub(self, text: str, secrets: Iterable[str]) -> str:
        """``text`` with each of ``secrets`` (longest first) replaced by its fingerprint."""
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, self.fingerprint(secret))
        return text

    # Helpers

    def _path(self, path: str) -> str:
        for pattern in self.path_patterns:
            path = pattern.sub(lambda m: self._replace_groups(m), path)
        # ;parameters of path segments (/a;jsessionid=...;v=1/b)
        return "/".join(
            head + (";" + self.pairs(params) if sep else "")
            for head, sep, params in (segment.partition(";") for segment in path.split("/"))
        )

    def _replace_groups(self, match: re.Match[str]) -> str:
        if not match.re.groups:
            return self.fingerprint(match[0])
        text, start, pieces = match.string, match.start(), []
        for group in range(1, match.re.groups + 1):
            if match.start(group) < 0:
                continue
            pieces.append(text[start : match.start(group)])
            pieces.append(self.fingerprint(match[group]))
            start = match.end(group)
        pieces.append(text[start : match.end()])
        return "".join(pieces)

    def _urls_in_header(self, name: str, value: str) -> str:
        if name == "link":
            return _URL_IN_LINK.sub(lambda m: f"<{self.url(m[1])}>", value)
        if name == "refresh":
            return _URL_IN_REFRESH.sub(lambda m: m[1] + self.url(m[2]), value)
        return self.url(value.strip())


class LibraryLogFilter(logging.Filter):
    """Redacts the URLs that HTTP libraries log (httpx logs every request's
    full URL at INFO) with every redactor an audited client uses."""

    def __init__(self) -> None:
        super().__init__()
        self.redactors: set[Redactor] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and self.redactors:
            args = [self._redact(arg) for arg in record.args]
            if str(record.msg).startswith("HTTP Request:") and len(args) == 5:
                # A server's own reason phrase may echo what it was sent.
                args[4] = _standard_reason(args[3])
            record.args = tuple(args)
        return True

    def _redact(self, arg: Any) -> Any:
        if type(arg).__name__ != "URL":  # httpx.URL or httpx2.URL
            return arg
        text = str(arg)
        for redactor in self.redactors:
            text = redactor.url(text)
        return text


def _standard_reason(status: Any) -> str:
    try:
        return HTTPStatus(int(status)).phrase
    except (TypeError, ValueError):
        return ""


def redact_library_logs(redactor: Redactor, libraries: Iterable[str] = ("httpx", "httpx2")) -> None:
    """Make the loggers of ``libraries`` redact request URLs with ``redactor`` too."""
    for name in libraries:
        logger = logging.getLogger(name)
        existing = [f for f in logger.filters if isinstance(f, LibraryLogFilter)]
        log_filter = existing[0] if existing else LibraryLogFilter()
        if not existing:
            logger.addFilter(log_filter)
        log_filter.redactors.add(redactor)


def _secret_members(text: str, sensitive: Any) -> list[tuple[int, int]]:
    """The spans of the values of ``"name": value`` members with a secret name
    in JSON-like text (whole objects and arrays included), found in one pass:
    text a client cannot parse (JSON kept as text, cut bodies) costs no more
    than its length."""
    spans: list[tuple[int, int]] = []
    at = 0
    while (start := text.find('"', at)) >= 0:
        end = _string_end(text, start)
        if end < 0:
            break  # an unclosed string: no complete member after it
        colon = _after_space(text, end)
        at = end
        if colon < len(text) and text[colon] == ":":
            try:
                name = json.loads(text[start:end])
            except ValueError:
                continue
            value = _after_space(text, colon + 1)
            if isinstance(name, str) and sensitive(name):
                at = _value_end(text, value)
                spans.append((value, at))
    return spans


def _after_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _string_end(text: str, quote: int) -> int:
    """The index after the JSON string opened at ``quote``; -1 when unclosed."""
    rest = _STRING_REST.match(text, quote + 1)
    return rest.end() if rest else -1


def _value_end(text: str, start: int) -> int:
    """The index after the JSON value at ``start``: a string, an object or an
    array (nesting and strings in it followed), or a scalar."""
    if start >= len(text):
        return start
    if text[start] == '"':
        end = _string_end(text, start)
        return len(text) if end < 0 else end
    if text[start] not in "{[":
        scalar = _SCALAR.match(text, start)
        return scalar.end() if scalar else start
    depth, at = 0, start
    while at < len(text):
        char = text[at]
        if char == '"':
            at = _string_end(text, at)
            if at < 0:
                return len(text)
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return at + 1
        at += 1
    return len(text)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _secret_leaves(value: Any, sensitive: Any) -> list[str]:
    if isinstance(value, dict):
        found: list[str] = []
        for k, v in value.items():
            found += [_as_text(v)] if sensitive(k) else _secret_leaves(v, sensitive)
        return found
    if isinstance(value, list):
        return [s for item in value for s in _secret_leaves(item, sensitive)]
    return []


def _with_derived_forms(values: Iterable[str]) -> list[str]:
    """Each value as it may reappear in free text, longest first (so a secret
    that contains another is removed whole)."""
    forms: set[str] = set()
    for value in values:
        candidates = {value, value.strip(), unquote_plus(value)}
        if scheme := _AUTH_SCHEME.match(value):
            rest = scheme["rest"].strip()
            candidates.add(rest)
            if scheme["scheme"].lower() == "basic":
                candidates.update(_basic_credentials(rest))
        if "=" in value and ";" not in value:  # a cookie: name=value
            candidates.add(value.partition("=")[2])
        for candidate in list(candidates):
            candidates.update(
                {
                    quote(candidate, safe=""),
                    quote_plus(candidate),
                    json.dumps(candidate)[1:-1],
                    json.dumps(candidate, ensure_ascii=False)[1:-1],
                    repr(candidate)[1:-1],
                    repr(candidate.encode("utf-8", "surrogatepass"))[2:-1],
                    candidate.encode("unicode_escape").decode("ascii"),
                }
            )
        forms.update(c for c in candidates if len(c.strip()) >= _MIN_SECRET_LENGTH)
    return sorted(forms, key=len, reverse=True)


def _basic_credentials(encoded: str) -> list[str]:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return []
    return [decoded, *decoded.split(":", 1)]
