"""The README stays true: its plugin examples and Python cell run, its commands parse and name files that exist,
its generated tables are what `harness report` writes, and the manual's layout names files that exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from dashboard import report
from harness.cli import build_parser, main

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
    ("# my_shift.py", ["--threat", "preprocessor-blind", "--set", "shift=my-darken"]),
])
def test_readme_plugin_examples_run(block, args, tmp_path, capsys):
    plugin = tmp_path / block[2:].split(":")[0].strip()
    plugin.write_text(python_block(block))
    code = main(["run", "--plugin", str(plugin), *args, "--n-examples", "16", "--set", "steps=2", "--set", "apgd_steps=2",
                 "--db", str(tmp_path / "r.db"), "--json", "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_readme_python_cell_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("from harness.evaluation import"), "README.md", "exec"), {})
    assert (tmp_path / "results.db").is_file()


def _commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks of ``text`` (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                out.append(line.strip())
    return out


def test_every_readme_command_parses_and_names_files_that_exist():
    parser = build_parser()
    harness_commands = 0
    for line in _commands(README):
        for cmd in re.split(r"\s*&&\s*", line):
            words = shlex.split(cmd, comments=True)
            if words and words[0] in ("export", "ray"):  # the cluster set-up (tests/test_ray_cluster.py runs a cluster)
                assert words[0] != "ray" or words[1] in ("start", "stop"), cmd
                continue
            if not words or words[0] in (".", "make"):
                assert not words or words[0] != "make" or words[1] in ("run", "test", "docs", "smoke"), cmd
                continue
            assert words[0] == "harness", f"README command {cmd!r} is not a harness, make or activate command"
            harness_commands += 1
            parser.parse_args(words[1:])  # argparse exits (a test failure) on an unknown flag or command
            for w in words[1:]:
                if re.fullmatch(r"[\w./-]+\.(yaml|csv|py)", w) and not Path(w).name.startswith("my_"):
                    assert (ROOT / w).is_file(), f"README command {cmd!r} names {w}, which does not exist"
    assert harness_commands >= 10


def test_readme_grid_is_the_shipped_file():
    block = re.search(r"```yaml\n# (grids/[\w.-]+\.yaml)\n(.*?)```", README, re.S)
    assert block, "README shows no grid file"
    assert yaml.safe_load(block.group(2)) == yaml.safe_load((ROOT / block.group(1)).read_text())


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_generated_tables_are_what_harness_report_writes(page, capsys, monkeypatch):
    text = (ROOT / page).read_text()
    blocks = re.findall(r"^<!-- BEGIN harness report (.*?) -->$", text, re.M)
    if page == "README.md":
        assert blocks, "the README's headline table must be a `harness report` block"
    monkeypatch.chdir(ROOT)
    for args in blocks:
        assert "--table" in args, f"{page}: block `{args}` must render a committed table (a store is not in the repository)"
        assert main(["report", *shlex.split(args)]) == 0
        body = capsys.readouterr().out
        assert report.block(text, args) == body, f"{page} is stale: run `harness report {args} --out {page} --insert`"


def test_manual_layout_matches_the_tree():
    layout = (ROOT / "docs" / "layout.md").read_text()
    block = layout[layout.index("```\n") + 4:]
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
    assert not missing, f"docs/layout.md names paths that do not exist: {missing}"
