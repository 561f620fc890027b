"""The documentation site builds with ``mkdocs build --strict`` (every page in
the nav, every link and anchor resolved), its command line reference is
generated from the click commands themselves, and the README is a short
front page whose links lead into the docs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# CI copies these two lines from the README; .ci/run runs the second verbatim.
DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install . && "
    ".venv/bin/callindex demo --kill-one --legacy"
)
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/pytest"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_site_builds_strictly_with_a_generated_cli_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr

    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    # Rendered from the commands, options included: present only if
    # mkdocs-click loaded the lazily listed subcommands.
    generated = ["callindex db upgrade", "callindex verify", "--pending-older-than"]
    generated += ["callindex db adopt", "--lock-timeout", "callindex bench", "--repeats"]
    for text in generated:
        assert text in cli, f"{text!r} is missing from the generated CLI reference"
    assert "::: mkdocs-click" not in cli
    for page in DOCS.glob("*.md"):
        html = site / "index.html" if page.stem == "index" else site / page.stem / "index.html"
        assert html.exists(), f"{page.name} was not built"


def nav_pages(entries: list[Any]) -> list[str]:
    pages: list[str] = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_nav_lists_every_page_once() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md"))
    assert config["theme"]["name"] == "material"
    assert config["strict"] is True


def test_the_readme_is_a_short_front_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert DEMO_COMMAND in text
    assert TEST_COMMAND in text
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_links_resolve_and_lead_to_every_docs_page() -> None:
    targets = [
        link.split("#", 1)[0]
        for link in LINK.findall(README.read_text(encoding="utf-8"))
        if not link.startswith(("http://", "https://", "#"))
    ]
    for target in targets:
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    linked = {Path(t).name for t in targets if t.startswith("docs/")}
    assert linked == {p.name for p in DOCS.glob("*.md")}
