"""The documentation's examples run as written.

Every ```python block of README.md and docs/*.md runs on its own, as a user
would paste it, in a fresh temporary folder (so ``sqlite:///callindex.db``
lands there), with the loopback HTTP and LLM server standing in for the APIs
the client examples reach through ``API_URL`` and ``LLM_BASE_URL``.

The runnable example of docs/coming-from-an-in-process-allocator.md also runs
on SQLite and PostgreSQL against the loopback server, and the trail it leaves
numbers the HTTP and the LLM calls of one state 0..n-1.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mktestdocs import grab_code_blocks

from callindex import Call, CallRecorder
from callindex.loopback import LoopbackAPI, Reply

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
PAGE = DOCS / "coming-from-an-in-process-allocator.md"
MARKER = "<!-- example: migration -->"
SECRET = "sk-docs-example-secret-0123456789"
# Fences the pages may use; only python blocks run. A block that is not meant
# to run says so with another language, never with a variant of python.
LANGUAGES = {"python", "sh", "sql", "text"}
FENCE = re.compile(r"^\s*```(\S*)\s*$")


def fence_languages(text: str) -> list[str]:
    """The language of every opening fence, in order."""
    languages: list[str] = []
    inside = False
    for line in text.splitlines():
        if match := FENCE.match(line):
            if not inside:
                languages.append(match.group(1))
            inside = not inside
    assert not inside, "a code block is never closed"
    return languages


def python_blocks(page: Path) -> list[str]:
    return [str(code) for code in grab_code_blocks(page.read_text(encoding="utf-8"))]


def every_python_block() -> list[Any]:
    """``pytest.param(name, code)`` for each python block, named ``page#n``."""
    params: list[Any] = []
    for page in PAGES:
        for number, code in enumerate(python_blocks(page), 1):
            name = f"{page.relative_to(ROOT)}#{number}"
            params.append(pytest.param(name, code, id=name))
    return params


BLOCKS = every_python_block()


@pytest.fixture
def api() -> Iterator[LoopbackAPI]:
    with LoopbackAPI() as server:
        yield server


@pytest.fixture
def as_a_user(api: LoopbackAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh folder as the working directory, and the environment the
    examples read: the loopback server as the HTTP API and the LLM endpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CALLINDEX_DATABASE_URL", raising=False)
    monkeypatch.delenv("CALLINDEX_REDACTION_KEY", raising=False)
    monkeypatch.setenv("API_URL", api.url)
    monkeypatch.setenv("ITEMS_API_URL", api.url)
    monkeypatch.setenv("LLM_BASE_URL", f"{api.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return tmp_path


def run_block(name: str, code: str) -> None:
    """Run ``code`` as a script, then close the recorders it left open, as the
    end of its process would: recorders of one URL share their connections,
    and a relative SQLite URL must not reach a folder of an earlier block."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    try:
        exec(compile(code, name, "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, CallRecorder):
                value.close()
        namespace.clear()
        gc.collect()


# Every python block of every page


@pytest.mark.parametrize(("name", "code"), BLOCKS)
def test_the_block_runs_as_written(name: str, code: str, as_a_user: Path) -> None:
    run_block(name, code)
    if "upgrade(" in code:  # it created its database: here, not in an earlier block's folder
        for database in re.findall(r"sqlite:///([\w.-]+\.db)\b", code):
            assert (as_a_user / database).exists(), f"{database} is not in the fresh folder"


def test_every_page_uses_known_fences_and_every_python_block_is_run() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        languages = fence_languages(text)
        assert set(languages) <= LANGUAGES, f"{page.name}: fences {set(languages) - LANGUAGES}"
        assert len(python_blocks(page)) == languages.count("python"), (
            f"{page.name}: a python block is not found, so not run"
        )
    assert len(BLOCKS) >= 20, "the pages lost their examples"


def test_the_readme_example_records_each_call_once_however_often_it_runs(
    as_a_user: Path,
) -> None:
    """The README's example, run twice as a script: the same two lines, since
    its calls carry their call_id."""
    [code] = grab_code_blocks(README.read_text(encoding="utf-8"))
    (as_a_user / "example.py").write_text(code, encoding="utf-8")
    outputs = [
        subprocess.run(
            [sys.executable, "example.py"], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert outputs[0] == outputs[1] == "0 http success\n1 llm success\n"
    assert (as_a_user / "callindex.db").exists()


# The migration page's worked example, on both backends


def example_code() -> str:
    """The fenced python block right after the page's example marker."""
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"{PAGE.name} must mark exactly one runnable example"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert block, f"no ```python block right after {MARKER} in {PAGE.name}"
    return block.group(1)


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
