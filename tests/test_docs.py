"""Every code example in the README and in docs/ runs, so that no documented example can rot.

A page's ``python`` blocks are joined, in order, into one test module (a page reads like a
notebook: a later block may use what an earlier one defined) and run by pytest with this
plugin: its top-level code runs at collection, its ``test_...`` functions run as tests with the
fixtures, snapshots are written fresh. Lines of its ``bash`` blocks that run ``modelhooks`` are
run through the command line's ``main``, from the repository root, and must exit as the line's
comment says (``# exit 1``; 0 otherwise). ``text`` blocks are output, not run.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(page.read_text()) if lang == language]


def test_every_docs_page_is_found_and_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 8
    for page in pages:
        assert f"(docs/{page.name})" in readme, f"README does not link {page.name}"


@pytest.mark.parametrize(
    "page", [page for page in PAGES if blocks(page, "python")], ids=lambda page: page.name
)
def test_the_python_examples_run(page: Path, pytester: pytest.Pytester) -> None:
    code = "\n\n".join(textwrap.dedent(block) for block in blocks(page, "python"))
    code += "\n\n\ndef test_the_page_ran():\n    pass\n"  # a page of plain code counts as one test
    pytester.makepyfile(**{f"test_{page.stem.replace('-', '_').lower()}": code})
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    result = pytester.runpytest_subprocess("--snapshot-update", "-p", "no:randomly")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and not outcomes.get("failed") and not outcomes.get("errors"), result.stdout.str()


def _commands(page: Path) -> list[tuple[list[str], int]]:
    found = []
    for block in blocks(page, "bash"):
        for line in block.splitlines():
            if not line.startswith("modelhooks "):
                continue
            command, _, comment = line.partition(" # ")
            expected = int(comment.split("exit")[1].split()[0]) if "exit" in comment else 0
            found.append((shlex.split(command)[1:], expected))
    return found


@pytest.mark.parametrize("page", [page for page in PAGES if _commands(page)], ids=lambda page: page.name)
def test_the_command_lines_run_as_documented(
    page: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_modelhooks.cli import main

    monkeypatch.chdir(ROOT)
    for argv, expected in _commands(page):
        status = main(argv, prog="modelhooks")
        assert status == expected, f"modelhooks {shlex.join(argv)} exited {status}:\n{capsys.readouterr()}"
