"""The repository speaks of the product and its users only: no file tells how it was developed
(work sessions, borrowed machines, what a later attempt should do). History belongs in the
changelog's versions; measurements in docs/performance.md, with their command and hardware."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# spelled in pieces, so that this file does not match itself
_WORDS = [
    r"sess" + r"ion[ -]?\d",
    r"(earlier|later|previous|next|last|this|that) sess" + r"ion\b",
    r"\blent (gpu|machine|device|h[12]00)",
    r"\b(gpu|machine|device|h[12]00) le" + r"nt\b",
    r"(the|a) next (lent )?gp" + r"u\b",
    r"build sand" + r"box",
    r"\bsand" + r"box\b",
    r"internal tar" + r"get",
    r"next ti" + r"me\b",
]
FORBIDDEN = re.compile("|".join(_WORDS), re.IGNORECASE)


def _tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [ROOT / name for name in listed if name]
    suffixes = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".yml", ".yaml", ""}
    return [path for path in paths if path.is_file() and path.suffix in suffixes]


def test_no_tracked_file_speaks_of_how_the_project_was_developed() -> None:
    offences = []
    for path in _tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if FORBIDDEN.search(line):
                offences.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize(
    "line",
    [
        "the " + "sess" + "ion-4 run",
        "on the next " + "le" + "nt GPU",
        "an H200 " + "le" + "nt in an earlier run",
    ],
)
def test_the_words_it_looks_for_are_found(line: str) -> None:
    assert FORBIDDEN.search(line)


def test_the_product_words_are_not_flagged() -> None:
    for line in [
        "session-scoped fixtures",
        "a pytest session",
        "the test session starts",
        "syrupy's session",
    ]:
        assert not FORBIDDEN.search(line), line
