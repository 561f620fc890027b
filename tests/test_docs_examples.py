"""The runnable example of docs/coming-from-an-in-process-allocator.md runs as
written, on SQLite and PostgreSQL, against the loopback HTTP and LLM server, and
the trail it leaves numbers the HTTP and the LLM calls of one state 0..n-1."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callindex import Call, CallRecorder
from callindex.loopback import LoopbackAPI, Reply

PAGE = Path(__file__).resolve().parents[1] / "docs" / "coming-from-an-in-process-allocator.md"
MARKER = "<!-- example: migration -->"
SECRET = "sk-docs-example-secret-0123456789"


def example_code() -> str:
    """The fenced python block right after the page's example marker."""
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"{PAGE.name} must mark exactly one runnable example"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert block, f"no ```python block right after {MARKER} in {PAGE.name}"
    return block.group(1)


@pytest.fixture
def api() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as server:
        yield server


def run_example(
    url: str, api: LoopbackAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, Any]:
    """Run the example as a user would, configured through its environment
    variables; returns its globals."""
    monkeypatch.chdir(tmp_path)  # the example's default database is a file in the cwd
    monkeypatch.setenv("CALLINDEX_DATABASE_URL", url)
    monkeypatch.setenv("ITEMS_API_URL", api.url)
    monkeypatch.setenv("LLM_BASE_URL", f"{api.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("CALLINDEX_REDACTION_KEY", raising=False)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(example_code(), str(PAGE), "exec"), namespace)
    return namespace


def recorded(url: str, state_id: str) -> list[Call]:
    with CallRecorder(url) as recorder:
        calls = recorder.calls(state_id)
        assert recorder.verify().ok
    return calls


def assert_one_state_numbered(calls: list[Call], types: list[str], statuses: list[str]) -> None:
    assert [c.call_index for c in calls] == list(range(len(calls)))
    assert [c.call_type for c in calls] == types
    assert [c.status for c in calls] == statuses
    assert len({c.state_id for c in calls}) == 1
    for call in calls:
        expected = "/items/7" if call.call_type == "http" else "/v1/chat/completions"
        assert call.request["url"].endswith(expected)
        assert SECRET not in json.dumps(call.as_json()), "the API key reached the trail"


def test_the_migration_example_runs(
    db_url: str,
    api: LoopbackAPI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace = run_example(db_url, api, monkeypatch, tmp_path)

    calls = recorded(db_url, namespace["state_id"])
    assert_one_state_numbered(calls, ["http", "llm"], ["success", "success"])
    assert calls[1].response["body"]["json"]["model"] == "gpt-4o-mini"
    printed = capsys.readouterr().out
    assert "echo: Summarise item-7 in one line." in printed
    assert "0 http success" in printed and "1 llm success" in printed


def test_a_retried_attempt_takes_the_next_index(
    db_url: str, api: LoopbackAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api.plan(Reply.too_many_requests())  # the item lookup is refused once, then retried
    namespace = run_example(db_url, api, monkeypatch, tmp_path)

    calls = recorded(db_url, namespace["state_id"])
    assert_one_state_numbered(calls, ["http", "http", "llm"], ["error", "success", "success"])
    assert [c.request["attempt"] for c in calls[:2]] == [1, 2]


def test_the_example_creates_its_sqlite_file(
    api: LoopbackAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As the page says: a fresh SQLite path is all it needs."""
    path = tmp_path / "audit.db"
    url = f"sqlite:///{path}"
    namespace = run_example(url, api, monkeypatch, tmp_path)

    assert path.exists()
    calls = recorded(url, namespace["state_id"])
    assert_one_state_numbered(calls, ["http", "llm"], ["success", "success"])
