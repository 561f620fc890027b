"""Replay from the trail: a recorded state serves its responses again, in
index order, with the network gone; and ``callindex diff`` compares two states
by the same fingerprints replay matches on."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from click.testing import CliRunner, Result

from callindex import (
    AsyncAuditedHTTPClient,
    AuditedHTTPClient,
    AuditedTransport,
    CallRecorder,
    Redactor,
    ReplayMismatchError,
    ReplayTransport,
    RetryPolicy,
    UnknownStateError,
)
from callindex.cli import cli
from callindex.loopback import LoopbackAPI, Reply

FAST = RetryPolicy(initial_wait=0.01, max_wait=0.02)
RATE_LIMITED = Reply(429, {"retry-after-ms": "10"}, {"error": {"message": "rate limited"}})
ROUTED = Reply(status=0)  # a planned reply that lets the request through to its route


@pytest.fixture
def api() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as server:
        yield server


@pytest.fixture
def sqlite_recorder(sqlite_url: str) -> Iterator[CallRecorder]:
    with CallRecorder(sqlite_url) as recorder:
        for state in ("run-1", "run-2"):
            recorder.open_state(state)
        yield recorder


def diff(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", url, "diff", *args], catch_exceptions=False)


# A pipeline transform: one HTTP call and two LLM calls, the second built from the first.


def transform(http: httpx.Client, llm: openai.OpenAI) -> dict[str, Any]:
    item = http.get("/items/7").json()
    first = llm.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"describe {item['name']}"}]
    )
    second = llm.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": f"shorten {first.choices[0].message.content}"}],
    )
    return {
        "item": item,
        "answers": [c.choices[0].message.content for c in (first, second)],
        "ids": [first.id, second.id],  # random per answer: equal only when replayed
    }


def run_transform(
    recorder: CallRecorder, state: str, base_url: str, api_key: str, http_inner: Any, llm_inner: Any
) -> dict[str, Any]:
    http = AuditedHTTPClient(
        recorder, state, base_url=base_url, retry=FAST, inner=http_inner,
        headers={"Authorization": f"Bearer {api_key}"},
    )  # fmt: skip
    transport = AuditedTransport(recorder, state, inner=llm_inner, call_type="llm")
    llm = openai.OpenAI(
        base_url=f"{base_url}/v1", api_key=api_key, max_retries=2,
        http_client=httpx2.Client(transport=transport),
    )  # fmt: skip
    with http, llm:
        return transform(http, llm)


def outcomes(recorder: CallRecorder, state: str) -> list[tuple[int, str, str, Any]]:
    return [
        (c.call_index, c.call_type, c.status, (c.response or {}).get("status_code"))
        for c in recorder.calls(state)
    ]


def test_the_transform_replays_strictly_with_the_network_gone(
    recorder: CallRecorder, api: LoopbackAPI, db_url: str
) -> None:
    for state in ("run-1", "run-2"):
        recorder.open_state(state)
    api.plan(RATE_LIMITED, ROUTED, RATE_LIMITED)  # the GET and the first completion retry
    live = run_transform(
        recorder, "run-1", api.url, "sk-first-key-1111", None, httpx2.HTTPTransport()
    )
    assert outcomes(recorder, "run-1") == [
        (0, "http", "error", 429), (1, "http", "success", 200),
        (2, "llm", "error", 429), (3, "llm", "success", 200), (4, "llm", "success", 200),
    ]  # fmt: skip
    api.stop()
    served = api.stats["requests"]

    replay = ReplayTransport(recorder, "run-1")  # one replay for both libraries' clients
    replayed = run_transform(recorder, "run-2", api.url, "sk-other-key-2222", replay, replay)

    assert replayed == live
    assert replay.remaining == 0
    assert api.stats["requests"] == served
    assert outcomes(recorder, "run-2") == outcomes(recorder, "run-1")
    result = diff(db_url, "run-1", "run-2")
    assert (result.exit_code, result.stdout) == (
        0,
        "0 difference(s) between run-1 (5 calls) and run-2 (5 calls)\n",
    )


def test_the_openai_sdk_replays_over_httpx2_with_its_retry(
    sqlite_recorder: CallRecorder, api: LoopbackAPI
) -> None:
    api.plan(RATE_LIMITED)
    recording = AuditedTransport(
        sqlite_recorder, "run-1", inner=httpx2.HTTPTransport(), redactor=Redactor()
    )

    def ask(transport: Any) -> Any:
        with openai.OpenAI(
            base_url=f"{api.url}/v1", api_key="sk-sdk-key", max_retries=2,
            http_client=httpx2.Client(transport=transport),
        ) as client:  # fmt: skip
            return client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}]
            )

    live = ask(recording)
    assert [c.response["status_code"] for c in sqlite_recorder.calls("run-1")] == [429, 200]
    api.stop()
    replay = ReplayTransport(sqlite_recorder, "run-1", redactor=Redactor())
    replayed = ask(replay)
    assert replayed.model_dump(exclude={"usage"}) == live.model_dump(exclude={"usage"})
    # Token counts are numbers, not secrets: they replay as they were.
    assert replayed.usage.prompt_tokens == live.usage.prompt_tokens
    assert replay.remaining == 0
    with pytest.raises(ReplayMismatchError, match="have been served"):  # not retried, not wrapped
        ask(replay)


def record_two(recorder: CallRecorder, api: LoopbackAPI, **options: Any) -> None:
    with AuditedHTTPClient(recorder, "run-1", base_url=api.url, retry=FAST, **options) as http:
        http.get("/items/1")
        http.post("/echo", json={"n": 1})


def test_a_changed_body_is_a_mismatch_naming_the_index(
    sqlite_recorder: CallRecorder, api: LoopbackAPI
) -> None:
    record_two(sqlite_recorder, api, headers={"Authorization": "Bearer sk-planted-9999"})
    replay = ReplayTransport(sqlite_recorder, "run-1")
    with httpx.Client(base_url=api.url, transport=replay) as client:
        assert client.get("/items/1").json() == {"id": "1", "name": "item-1"}
        with pytest.raises(ReplayMismatchError, match=r"call_index 1: body differ") as caught:
            client.post("/echo", json={"n": 2}, headers={"Authorization": "Bearer sk-planted-9999"})
        assert (caught.value.call_index, caught.value.differing) == (1, ("body",))
        assert "sk-planted-9999" not in str(caught.value)
        assert '"n"' not in str(caught.value)
        assert client.post("/echo", json={"n": 1}).json() == {"received": {"n": 1}}
        with pytest.raises(ReplayMismatchError, match=r"all 2 recorded call\(s\) have been served"):
            client.get("/items/1")


def test_strict_refuses_and_lenient_serves_out_of_order(
    sqlite_recorder: CallRecorder, api: LoopbackAPI
) -> None:
    record_two(sqlite_recorder, api)
    api.stop()
    with httpx.Client(
        base_url=api.url, transport=ReplayTransport(sqlite_recorder, "run-1")
    ) as strict:
        with pytest.raises(ReplayMismatchError, match="call_index 0") as caught:
            strict.post("/echo", json={"n": 1})
        assert caught.value.differing == ("method", "url", "body")
    lenient = ReplayTransport(sqlite_recorder, "run-1", "lenient")
    with httpx.Client(base_url=api.url, transport=lenient) as client:
        assert client.post("/echo", json={"n": 1}).json() == {"received": {"n": 1}}
        with pytest.raises(ReplayMismatchError, match="no recorded call left matches"):
            client.get("/items/2")
        assert client.get("/items/1").json() == {"id": "1", "name": "item-1"}
    assert lenient.remaining == 0


def test_a_dropped_connection_replays_as_a_transport_error(
    sqlite_recorder: CallRecorder, api: LoopbackAPI
) -> None:
    api.plan(Reply(drop=True))
    with AuditedHTTPClient(sqlite_recorder, "run-1", base_url=api.url, retry=FAST) as http:
        live = http.get("/items/1").json()
    dropped, answered = sqlite_recorder.calls("run-1")
    assert (dropped.status, dropped.response, answered.status) == ("error", None, "success")
    api.stop()

    with httpx.Client(
        base_url=api.url, transport=ReplayTransport(sqlite_recorder, "run-1")
    ) as client:
        with pytest.raises(httpx.TransportError) as caught:
            client.get("/items/1")
        assert type(caught.value).__name__ == dropped.error["type"] != "TransportError"
        assert str(caught.value) == dropped.error["message"]
        assert client.get("/items/1").json() == live

    replay = ReplayTransport(sqlite_recorder, "run-1")
    with AuditedHTTPClient(
        sqlite_recorder, "run-2", base_url=api.url, retry=FAST, inner=replay
    ) as http:
        assert http.get("/items/1").json() == live  # retried, as it was
    assert [c.error for c in sqlite_recorder.calls("run-2")] == [dropped.error, None]


def test_an_async_client_replays(sqlite_recorder: CallRecorder, api: LoopbackAPI) -> None:
    async def post(client: httpx.AsyncClient) -> Any:
        async with client:
            return (await client.post("/echo", json={"async": True})).json()

    recording = AsyncAuditedHTTPClient(sqlite_recorder, "run-1", base_url=api.url, retry=FAST)
    live = asyncio.run(post(recording))
    api.stop()
    replay = ReplayTransport(sqlite_recorder, "run-1")
    assert asyncio.run(post(httpx.AsyncClient(base_url=api.url, transport=replay))) == live
    assert replay.remaining == 0


def test_only_secrets_differ_still_matches_and_secrets_replay_redacted(
    sqlite_recorder: CallRecorder, api: LoopbackAPI, sqlite_url: str
) -> None:
    redactor = Redactor(b"a deployment key")

    def requests(http: httpx.Client, secret: str) -> list[Any]:
        return [
            http.get("/items/1", params={"api_key": secret}).json(),
            http.post("/echo", json={"password": secret, "q": 1}).json(),
        ]

    def client(state: str, secret: str, inner: Any = None) -> AuditedHTTPClient:
        return AuditedHTTPClient(
            sqlite_recorder, state, base_url=api.url, retry=FAST, redactor=redactor,
            headers={"Authorization": f"Bearer {secret}"}, inner=inner,
        )  # fmt: skip

    with client("run-1", "sk-recorded-1111") as http:
        live = requests(http, "sk-recorded-1111")
    assert live[1] == {"received": {"password": "sk-recorded-1111", "q": 1}}
    api.stop()

    replay = ReplayTransport(sqlite_recorder, "run-1", redactor=redactor)
    with client("run-2", "sk-replayed-2222", replay) as http:
        replayed = requests(http, "sk-replayed-2222")
    assert replayed[0] == live[0]
    password = replayed[1]["received"]["password"]  # a redacted value replays redacted
    assert password.startswith("hmac-sha256:") and password == redactor.fingerprint(
        "sk-recorded-1111"
    )
    assert diff(sqlite_url, "run-1", "run-2").exit_code == 0


def test_an_unknown_state_is_refused_on_the_first_request(sqlite_recorder: CallRecorder) -> None:
    client = httpx.Client(transport=ReplayTransport(sqlite_recorder, "nope"))
    with client, pytest.raises(UnknownStateError, match="unknown state 'nope'"):
        client.get("http://127.0.0.1:9/")


def test_diff_lists_the_calls_that_differ(
    sqlite_recorder: CallRecorder, api: LoopbackAPI, sqlite_url: str
) -> None:
    with AuditedHTTPClient(sqlite_recorder, "run-1", base_url=api.url) as http:
        http.get("/items/1")
        http.get("/items/2")
    api.plan(Reply(200, body={"id": "1", "name": "changed"}))
    with AuditedHTTPClient(sqlite_recorder, "run-2", base_url=api.url) as http:
        http.get("/items/1")  # the same request, another response
        http.get("/items/3")  # another request
        http.get("/items/4")  # one call more

    result = diff(sqlite_url, "run-1", "run-2")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "position 0: call_index 0 in run-1, call_index 0 in run-2: response differ(s)",
        "position 1: call_index 1 in run-1, call_index 1 in run-2: request, response differ(s)",
        "position 2: no call in run-1, call_index 2 in run-2: missing differ(s)",
        "3 difference(s) between run-1 (2 calls) and run-2 (3 calls)",
    ]
    result = diff(sqlite_url, "run-1", "run-2", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["calls_a"], report["calls_b"]) == (2, 3)
    assert [(d["index_a"], d["differing"]) for d in report["differences"]] == [
        (0, ["response"]), (1, ["request", "response"]), (None, ["missing"])
    ]  # fmt: skip
    assert diff(sqlite_url, "run-1", "run-1", "--json").exit_code == 0

    unknown = diff(sqlite_url, "run-1", "nope")
    assert unknown.exit_code == 1
    assert unknown.stderr.strip() == "Error: unknown state 'nope': open it first " + (
        "(CallRecorder.open_state or `callindex state open`)"
    )


def _record_through(recorder: CallRecorder, handler: Any) -> None:
    """Record one GET answered by ``handler`` (an httpx.MockTransport: the body is read
    before the audited transport sees it, as with a cache), into run-1."""
    inner = httpx.MockTransport(handler)
    with (
        httpx.Client(transport=AuditedTransport(recorder, "run-1", inner)) as client,
        contextlib.suppress(httpx.TransportError),  # a body that broke off
    ):
        client.get("https://api.example/items/1").read()


def test_a_body_recorded_decoded_replays_without_its_encoding(
    sqlite_recorder: CallRecorder,
) -> None:
    compressed = gzip.compress(json.dumps({"id": "1"}).encode())
    _record_through(
        sqlite_recorder,
        lambda request: httpx.Response(
            200, headers={"content-encoding": "gzip"}, content=compressed
        ),
    )
    replay = ReplayTransport(sqlite_recorder, "run-1")
    with httpx.Client(transport=replay) as client:
        assert client.get("https://api.example/items/1").json() == {"id": "1"}


def test_a_body_that_broke_off_replays_the_same_failure(sqlite_recorder: CallRecorder) -> None:
    class BrokenOff(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b'{"partial":'
            raise httpx.RemoteProtocolError("peer closed connection")

    _record_through(sqlite_recorder, lambda request: httpx.Response(200, stream=BrokenOff()))
    (recorded,) = sqlite_recorder.calls("run-1")
    assert recorded.status == "error" and recorded.error["type"] == "RemoteProtocolError"
    with (
        httpx.Client(transport=ReplayTransport(sqlite_recorder, "run-1")) as client,
        pytest.raises(httpx.RemoteProtocolError, match="peer closed"),
    ):
        client.get("https://api.example/items/1")


def test_a_body_stored_cut_is_not_served_short(sqlite_recorder: CallRecorder) -> None:
    large = b"x" * (300 * 1024)
    _record_through(sqlite_recorder, lambda request: httpx.Response(200, content=large))
    with (
        httpx.Client(transport=ReplayTransport(sqlite_recorder, "run-1")) as client,
        pytest.raises(ReplayMismatchError, match="cannot be replayed"),
    ):
        client.get("https://api.example/items/1")


def test_a_mismatch_never_quotes_a_secret_of_the_url(
    sqlite_recorder: CallRecorder, api: LoopbackAPI
) -> None:
    record_two(sqlite_recorder, api)
    replay = ReplayTransport(sqlite_recorder, "run-1")
    with (
        httpx.Client(base_url=api.url, transport=replay) as client,
        pytest.raises(ReplayMismatchError, match="call_index 0") as caught,
    ):
        client.get("/items/2?token=sk-planted-9999")
    assert "sk-planted-9999" not in str(caught.value)
    assert caught.value.differing == ("url",)
