"""Every ```python block of README.md runs as written: each in a fresh folder, as its own
process (stdin gives one Enter, for the snippet that waits for it). A block that cannot run
alone is marked just before it with `<!-- not run: why -->`, and must say why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[int, str | None, str]]:
    """(line, why it is not run or None, code) of each python block, in order."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start("code")), m.group("why"), m.group("code"))
        for m in BLOCK.finditer(text)
    ]


RUN = [pytest.param(code, id=f"README.md:{line}") for line, why, code in blocks() if why is None]


def test_the_readme_has_python_blocks_and_says_why_it_leaves_any_out() -> None:
    found = blocks()
    assert len(RUN) >= 5, "the README's snippets are no longer found"
    left_out = {line: why for line, why, _ in found if why is not None}
    assert all(why.strip() for why in left_out.values())
    assert len(left_out) <= 3, f"more snippets left out than before: {left_out}"


@pytest.mark.parametrize("code", RUN)
def test_a_readme_snippet_runs_as_written(code: str, tmp_path: Path) -> None:
    (tmp_path / "snippet.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=tmp_path,
        input="\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
