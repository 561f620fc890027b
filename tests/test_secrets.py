"""No secret reaches the database or the logs.

A planted-secret matrix: each placement puts a fresh secret somewhere a real
request or response can carry one (headers, query, userinfo, path, bodies,
response headers, error text, retries), sends it through the audited clients,
then searches every column of every table and every log record, at DEBUG, of
every logger, for the secret and its derived forms.
"""

from __future__ import annotations

import base64
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from callindex import AuditedHTTPClient, AuditedLLMClient, CallRecorder, Redactor, RetryPolicy
from callindex.errors import InvalidHeaderError, InvalidInputError
from callindex.loopback import LoopbackAPI

from conftest import _database_url, create_database, drop_database

FAST = RetryPolicy(initial_wait=0.001, max_wait=0.002, max_attempts=3)
BASE = "https://api.example.test"


@dataclass
class Plant:
    """What a placement gets: a recorder, its own state and its own secret."""

    recorder: CallRecorder
    state_id: str
    secret: str
    api: LoopbackAPI

    def http(
        self, handler: Callable[[httpx.Request], httpx.Response] | None = None, **options: Any
    ) -> AuditedHTTPClient:
        options.setdefault("retry", None)
        options.setdefault("redactor", Redactor(None))
        inner = httpx.MockTransport(handler or _ok)
        return AuditedHTTPClient(self.recorder, self.state_id, inner=inner, **options)

    def get(
        self,
        url: str,
        handler: Callable[[httpx.Request], httpx.Response] | None = None,
        **options: Any,
    ) -> None:
        with self.http(handler, **options) as client:
            client.get(url)

    def post(self, url: str, **send: Any) -> None:
        with self.http() as client:
            client.post(url, **send)


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"ok": True})


def _json(body: Any, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, json=body, headers=headers)


def _raising(message: str) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(message, request=request)

    return handler


def _nested(depth: int, leaf: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = leaf
    for level in range(depth):
        value = {f"level{level}": value if level % 2 else [value]}
    return value


def _query(name: str) -> Callable[[Plant], None]:
    return lambda p: p.get(f"{BASE}/items?page=2&{name}={p.secret}")


PLACEMENTS: dict[str, Callable[[Plant], None]] = {
    # Request headers
    "authorization bearer": lambda p: p.get(BASE, headers={"Authorization": f"Bearer {p.secret}"}),
    "authorization basic": lambda p: p.get(
        BASE,
        headers={
            "Authorization": "Basic " + base64.b64encode(f"user:{p.secret}".encode()).decode()
        },
    ),
    "proxy-authorization": lambda p: p.get(
        BASE, headers={"Proxy-Authorization": f"Basic {p.secret}"}
    ),
    "cookie": lambda p: p.get(BASE, headers={"Cookie": f"sid={p.secret}; theme=dark"}),
    "x-api-key": lambda p: p.get(BASE, headers={"X-Api-Key": p.secret}),
    "api-key": lambda p: p.get(BASE, headers={"api-key": p.secret}),
    "x-auth-token": lambda p: p.get(BASE, headers={"X-Auth-Token": p.secret}),
    "x-client-secret": lambda p: p.get(BASE, headers={"X-Client-Secret": p.secret}),
    "x-jwt-assertion": lambda p: p.get(BASE, headers={"X-Jwt-Assertion": p.secret}),
    "x-credentials": lambda p: p.get(BASE, headers={"X-Credentials": p.secret}),
    "x-session-id": lambda p: p.get(BASE, headers={"X-Session-Id": p.secret}),
    "user-defined header": lambda p: p.get(
        BASE, headers={"X-Tenant-Pin": p.secret}, redactor=Redactor(names=["x-tenant-pin"])
    ),
    "per-request header": lambda p: _per_request_header(p),
    # Query, fragment, ;parameters, userinfo, path
    **{
        f"query {name}": _query(name)
        for name in (
            "api_key",
            "token",
            "key",
            "access_token",
            "password",
            "pwd",
            "pass",
            "jwt",
            "credential",
            "code",
            "client_secret",
            "sig",
            "X-Amz-Signature",
            "X-Amz-Credential",
            "X-Amz-Security-Token",
            "X-Goog-Signature",
            "X-Goog-Credential",
            "TOKEN",
        )
    },
    "query after ;": lambda p: p.get(f"{BASE}/items?page=2;token={p.secret};x=1"),
    "query percent-encoded": lambda p: p.get(
        f"{BASE}/items?token={quote(p.secret + '/+=', safe='')}"
    ),
    "fragment": lambda p: p.get(f"{BASE}/callback#access_token={p.secret}&state=1"),
    "path ;jsessionid": lambda p: p.get(f"{BASE}/shop;jsessionid={p.secret}/cart"),
    "userinfo user": lambda p: p.get(f"https://{p.secret}@api.example.test/"),
    "userinfo password": lambda p: p.get(f"https://user:{p.secret}@api.example.test/"),
    "path pattern": lambda p: p.get(
        f"{BASE}/bot{p.secret}/getMe", redactor=Redactor(path_patterns=[r"/bot([^/]+)/"])
    ),
    "user-defined query name": lambda p: p.get(
        f"{BASE}/?tenant_pin={p.secret}", redactor=Redactor(names=["tenant_pin"])
    ),
    # Request bodies
    "json password": lambda p: p.post(BASE, json={"user": "a", "password": p.secret}),
    "json client_secret nested": lambda p: p.post(
        BASE, json={"oauth": {"client": {"client_secret": p.secret}}}
    ),
    "json api_key deep in lists": lambda p: p.post(BASE, json=_nested(12, {"api_key": p.secret})),
    "json refresh_token": lambda p: p.post(BASE, json={"grant": {"refresh_token": p.secret}}),
    "json secret object": lambda p: p.post(
        BASE, json={"credentials": {"user": "u", "p": p.secret}}
    ),
    "form password": lambda p: p.post(BASE, data={"username": "u", "password": p.secret}),
    "form client_secret": lambda p: p.post(
        BASE, data={"grant_type": "client_credentials", "client_secret": p.secret}
    ),
    "llm api_key body field": lambda p: _llm(p, body_key=True),
    "llm api key": lambda p: _llm(p),
    # Responses
    "response json access_token": lambda p: p.get(
        BASE, _json({"token_type": "bearer", "data": {"access_token": p.secret}})
    ),
    "response echoes a request secret": lambda p: p.get(
        BASE,
        lambda r: httpx.Response(200, json={"echo": r.headers["x-api-key"]}),
        headers={"X-Api-Key": p.secret},
    ),
    "response text echoes a request secret": lambda p: p.get(
        BASE,
        lambda r: httpx.Response(200, text=f"you sent {r.headers['authorization']}"),
        headers={"Authorization": f"Bearer {p.secret}"},
    ),
    "response JSON kept as text": lambda p: p.get(
        BASE,
        lambda r: httpx.Response(
            200,
            content=f'{{"x": NaN, "password": "{p.secret}"}}'.encode(),
            headers={"content-type": "application/json"},
        ),
    ),
    "response JSON kept as text, secret object": lambda p: p.get(
        BASE,
        lambda r: httpx.Response(
            200,
            content=f'{{"x": NaN, "access_token": {{"value": "{p.secret}"}}}}'.encode(),
            headers={"content-type": "application/json"},
        ),
    ),
    "request JSON kept as text, secret list": lambda p: p.post(
        BASE, json={"id": 2**60, "api_key": [p.secret]}
    ),
    "response header location, unsplittable": lambda p: _unsplittable_location(p),
    "response header location, scheme-relative userinfo": lambda p: p.get(
        BASE, lambda r: httpx.Response(302, headers={"Location": f"//user:{p.secret}@h.test/"})
    ),
    "response header location": lambda p: p.get(
        BASE, lambda r: httpx.Response(302, headers={"Location": f"{BASE}/next?token={p.secret}"})
    ),
    "response header content-location": lambda p: p.get(
        BASE, lambda r: httpx.Response(200, headers={"Content-Location": f"/x?sig={p.secret}"})
    ),
    "response header link": lambda p: p.get(
        BASE,
        lambda r: httpx.Response(
            200, headers={"Link": f'<{BASE}/p2?access_token={p.secret}>; rel="next"'}
        ),
    ),
    "response header refresh": lambda p: p.get(
        BASE, lambda r: httpx.Response(200, headers={"Refresh": f"0; url=/x?code={p.secret}"})
    ),
    "response set-cookie": lambda p: p.get(
        BASE, lambda r: httpx.Response(200, headers={"Set-Cookie": f"sid={p.secret}; HttpOnly"})
    ),
    "response reason phrase": lambda p: p.get(
        BASE,
        lambda r: httpx.Response(
            401, extensions={"reason_phrase": f"bad key {r.headers['x-api-key']}".encode()}
        ),
        headers={"X-Api-Key": p.secret},
    ),
    # Error text, as it is, stripped, percent-encoded, without its scheme
    "error quotes the key": lambda p: _failing(p, lambda s: f"refused key {s}"),
    "error quotes it percent-encoded": lambda p: _failing(
        p, lambda s: f"GET /?k={quote_plus(s)} failed", secret=p.secret + " /x"
    ),
    "error quotes it escaped": lambda p: _failing(p, lambda s: f"bad header {s.encode()!r}"),
    "error quotes a basic pair": lambda p: _failing(
        p,
        lambda s: f"login as {base64.b64decode(s.split()[1]).decode()} failed",
        secret="Basic " + base64.b64encode(f"svc:{p.secret}".encode()).decode(),
    ),
    # Retries: every attempt recorded redacted, the retry log line too
    "retried connect errors": lambda p: _failing(p, lambda s: f"refused key {s}", retry=FAST),
    "retried 503s": lambda p: p.get(
        f"{BASE}/?token={p.secret}",
        lambda r: httpx.Response(503, text=f"busy, token {p.secret}"),
        retry=FAST,
    ),
    "retried over the network": lambda p: _network(p),
}


def _unsplittable_location(p: Plant) -> None:
    """httpx itself refuses the redirect (after the call is recorded)."""
    location = f"http://[x]/cb?access_token={p.secret}"
    with pytest.raises(httpx.RemoteProtocolError):
        p.get(BASE, lambda r: httpx.Response(302, headers={"Location": location}))


def _per_request_header(p: Plant) -> None:
    with p.http() as client:
        client.get(BASE, headers={"Authorization": f"token {p.secret}"})


def _llm(p: Plant, *, body_key: bool = False) -> None:
    handler = _json({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})
    with AuditedLLMClient(
        p.recorder, p.state_id, base_url=f"{BASE}/v1", model="m", retry=None,
        api_key=None if body_key else p.secret, redactor=Redactor(None),
        inner=httpx.MockTransport(handler),
    ) as llm:  # fmt: skip
        params = {"api_key": p.secret} if body_key else {}
        llm.chat([{"role": "user", "content": "hi"}], **params)


def _failing(
    p: Plant, message: Callable[[str], str], *, secret: str | None = None, retry: Any = None
) -> None:
    key = secret or f"Bearer {p.secret}"
    with (
        p.http(lambda r: _raising(message(r.headers["authorization"]))(r),
               headers={"Authorization": key}, retry=retry) as client,
        pytest.raises(httpx.ConnectError),
    ):  # fmt: skip
        client.get(BASE)


def _network(p: Plant) -> None:
    """A real connection refused, the key in the URL, retried."""
    url = f"http://user:{p.secret}@127.0.0.1:1/?api_key={p.secret}"
    with (
        AuditedHTTPClient(p.recorder, p.state_id, retry=FAST, redactor=Redactor(None)) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get(url)


# Where secrets could end up


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def trail(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CallRecorder]:
    """One database per backend for the whole matrix; each placement has its own state."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path_factory.mktemp("secrets") / "trail.db"
        shutil.copyfile(template, path)
        with CallRecorder(f"sqlite:///{path}", auto_open=True) as recorder:
            yield recorder
        return
    admin: Engine = request.getfixturevalue("pg_admin")
    name = create_database(admin, template=request.getfixturevalue("pg_template"))
    with CallRecorder(_database_url(name), auto_open=True) as recorder:
        yield recorder
    drop_database(admin, name)


@pytest.fixture(scope="module")
def loopback() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as api:
        yield api


def everything_stored(recorder: CallRecorder) -> str:
    """Every column of every row of every table, as text."""
    engine = create_engine(recorder.engine.url)
    try:
        with engine.connect() as conn:
            rows = [
                repr(tuple(row))
                for table in inspect(conn).get_table_names()
                for row in conn.execute(text(f'SELECT * FROM "{table}"'))
            ]
    finally:
        engine.dispose()
    return "\n".join(rows)


def forms_of(secret: str) -> list[str]:
    return [secret, quote(secret, safe=""), quote_plus(secret)]


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_a_planted_secret_is_stored_nowhere_and_logged_nowhere(
    placement: str, trail: CallRecorder, loopback: LoopbackAPI, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"PLANTED{uuid.uuid4().hex[:12]}"
    state_id = f"secrets-{placement.replace(' ', '-')}"
    caplog.set_level(logging.DEBUG)

    PLACEMENTS[placement](Plant(trail, state_id, secret, loopback))

    calls = trail.calls(state_id)
    assert calls, "the placement recorded nothing: it tests nothing"
    assert all(c.status != "pending" for c in calls)
    stored = everything_stored(trail)
    assert state_id in stored
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records) + caplog.text
    for form in forms_of(secret):
        assert form not in stored, f"{placement}: stored"
        assert form not in logged, f"{placement}: logged"


class TestRedactionKeepsWhatIsNotSecret:
    def test_urls_keep_their_other_parameters_as_written(self) -> None:
        redactor = Redactor(None)
        url = "https://h.test/a;v=1/b?page=2;token=t0ps3cret&q=a%20b#access_token=x1y2z3&s=1"
        assert redactor.url(url) == (
            "https://h.test/a;v=1/b?page=2;token=[redacted]&q=a%20b#access_token=[redacted]&s=1"
        )

    def test_json_fields_are_fingerprinted_at_any_depth_with_a_key(self) -> None:
        redactor = Redactor(b"k")
        body = {"a": [{"b": {"Client_Secret": "s3cr3t-value", "n": 1}}], "password": 12345}
        assert redactor.json(body) == {
            "a": [{"b": {"Client_Secret": redactor.fingerprint("s3cr3t-value"), "n": 1}}],
            "password": redactor.fingerprint("12345"),
        }

    def test_link_headers_keep_their_relations(self) -> None:
        headers = Redactor(None).headers(
            [("Link", '<https://h.test/p?page=2&sig=abcdef>; rel="next", </p1>; rel="prev"')]
        )
        assert headers["link"] == (
            '<https://h.test/p?page=2&sig=[redacted]>; rel="next", </p1>; rel="prev"'
        )


def test_a_body_of_escaped_quotes_is_redacted_in_one_pass(trail: CallRecorder) -> None:
    """256 KiB of \\" (a string that never closes) once took minutes to scan."""
    state_id = f"quotes-{uuid.uuid4().hex[:8]}"
    body = b'\\"' * (128 * 1024)
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    done = threading.Event()

    def fetch() -> None:
        with AuditedHTTPClient(trail, state_id, inner=transport, retry=None) as client:
            client.get(BASE)
        done.set()

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done.is_set(), "redacting the body did not finish within 60 s"
    (call,) = trail.calls(state_id)
    assert call.status == "success" and call.response["body"]["length"] == len(body)


class TestHeadersInEveryFormHttpxTakes:
    @pytest.mark.parametrize(
        "headers",
        [[("X-A", "b")], {"X-Api-Key": b"abc"}, httpx.Headers({"X-A": "b"})],
        ids=["list", "bytes", "Headers"],
    )
    def test_are_accepted(self, trail: CallRecorder, headers: Any) -> None:
        state_id = f"headers-{uuid.uuid4().hex[:8]}"
        transport = httpx.MockTransport(lambda r: httpx.Response(200))
        with AuditedHTTPClient(
            trail, state_id, headers=headers, inner=transport, retry=None
        ) as client:
            assert client.get(BASE).status_code == 200
        assert len(trail.calls(state_id)) == 1


class TestKeysThatHTTPCannotCarryAreRefused:
    def test_an_llm_key_with_a_trailing_newline(self, trail: CallRecorder) -> None:
        with pytest.raises(InvalidHeaderError) as refused:
            AuditedLLMClient(trail, "s", base_url=BASE, model="m", api_key="sk-PLANTEDnl0001\n")
        assert "PLANTEDnl0001" not in str(refused.value)

    def test_a_request_header_with_a_control_character_is_not_sent(
        self, trail: CallRecorder
    ) -> None:
        sent: list[httpx.Request] = []
        state_id = f"control-{uuid.uuid4().hex[:8]}"
        transport = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200))
        with (
            AuditedHTTPClient(trail, state_id, inner=transport, retry=None) as client,
            pytest.raises(InvalidHeaderError) as refused,
        ):
            client.get(BASE, headers={"X-Api-Key": "PLANTEDcc0002\r\nX-Evil: 1"})
        assert "PLANTEDcc0002" not in str(refused.value)
        assert sent == [] and trail.calls(state_id) == []

    def test_bad_redactor_settings_are_refused(self) -> None:
        with pytest.raises(InvalidInputError):
            Redactor(path_patterns=["/bot(["])
        with pytest.raises(InvalidInputError):
            Redactor(names="token")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "sensitive"),
    [
        ("prompt_tokens", False),
        ("completion_tokens", False),
        ("max_tokens", False),
        ("gen_ai.usage.input_tokens", False),
        ("access_token", True),
        ("refresh_token", True),
        ("x-auth-token", True),
        ("tokens", True),
        ("api_key_tokens", True),  # another fragment: still a secret
    ],
)
def test_token_counts_are_not_secrets(name: str, sensitive: bool) -> None:
    from callindex.redaction import is_sensitive

    assert is_sensitive(name) is sensitive
