"""The README's Python snippet runs as written, as a new user would paste it (issue: it once used
an undefined ``image``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_python_snippet_runs_as_written(tmp_path, tiny_checkpoint, monkeypatch):
    (block,) = python_blocks((ROOT / "README.md").read_text())
    # The snippet names the demo's checkpoint folder, relative to the repository root.
    assert '"outputs/tiny/model"' in block
    shutil.copytree(tiny_checkpoint, tmp_path / "outputs" / "tiny" / "model")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    (result,) = namespace["results"]
    assert isinstance(result.text, str) and result.num_generated > 0
