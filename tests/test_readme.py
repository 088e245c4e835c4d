"""The README stays true: its plugin examples run, and its layout names files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_block(first_line: str) -> str:
    """The ```python block of the README whose first line is ``first_line``."""
    m = re.search(r"```python\n(" + re.escape(first_line) + r".*?)```", README, re.S)
    assert m, f"README has no python block starting with {first_line!r}"
    return m.group(1)


@pytest.mark.parametrize("block,args", [
    ("# my_defense.py", ["--defense", "my-noise", "--threat", "adaptive", "--set", "sigma=0.2"]),
    ("# my_attack.py", ["--threat", "adaptive", "--set", "attacks=my-fgsm"]),
])
def test_readme_plugin_examples_run(block, args, tmp_path, capsys):
    plugin = tmp_path / block[2:].split(":")[0].strip()
    plugin.write_text(python_block(block))
    code = main(["run", "--plugin", str(plugin), *args, "--n-examples", "16", "--set", "steps=2", "--set", "apgd_steps=2",
                 "--db", str(tmp_path / "r.db"), "--json", "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_readme_layout_matches_the_tree():
    block = README[README.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[: block.index("```")]
    parents: list[tuple[int, Path]] = []
    missing = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head = line.strip().split("  ")[0]  # the names before the description
        if indent > 4 and not head.endswith((".py", "/")):
            continue  # a continued description
        while parents and parents[-1][0] >= indent:
            parents.pop()
        base = parents[-1][1] if parents else ROOT
        for name in re.split(r"[ ,]+", head):
            if not name or not re.fullmatch(r"[\w.-]+/?", name) or not (name.endswith(("/", ".py"))):
                continue
            path = base / name.rstrip("/")
            if not path.exists():
                missing.append(str(path.relative_to(ROOT)))
            if name.endswith("/") and len(head.split()) == 1:
                parents.append((indent, path))
    assert not missing, f"the README layout names paths that do not exist: {missing}"
