"""The manual stays true: generated pages are what their commands write, and the strict site build catches a broken link."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.reference import API_PACKAGES, BUILDERS, COMMAND

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_reference_pages_are_what_the_command_writes(tmp_path):
    # a fresh process: the test session has the toy plugins registered, the committed pages are the built-in registries
    out = tmp_path / "reference"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "ls", "--format", "markdown", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(BUILDERS)
    assert sorted(p.name for p in (DOCS / "reference").glob("*.md")) == sorted(BUILDERS), "docs/reference holds a page no command writes"
    stale = [name for name in BUILDERS if (out / name).read_text() != (DOCS / "reference" / name).read_text()]
    assert not stale, f"docs/reference/{', '.join(stale)} differ from what the code says: run `{COMMAND}`"


@pytest.mark.parametrize("name", ["smoke", "cifar10"])
def test_the_leaderboard_pages_are_what_harness_report_writes(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["report", "--table", f"tables/{name}.csv"]) == 0
    page = capsys.readouterr().out
    assert page == (DOCS / f"leaderboard-{name}.md").read_text(), \
        f"docs/leaderboard-{name}.md is stale: run `harness report --table tables/{name}.csv --out docs/leaderboard-{name}.md`"


def _site_copy(tmp_path: Path) -> Path:
    """The site's sources in a folder of their own (the API page without its directives: no package to read there)."""
    site = tmp_path / "site-src"
    site.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", site)
    shutil.copy(ROOT / "CONTRIBUTING.md", site)
    shutil.copytree(DOCS, site / "docs")
    (site / "docs" / "reference" / "api.md").write_text("# Python API\n" + "".join(f"\n## {p} {{#{p}}}\n" for p in API_PACKAGES))
    return site


def _build(site: Path) -> subprocess.CompletedProcess:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    return subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(site / "out")], cwd=site, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_strict_build_fails_on_a_broken_link_and_takes_a_new_leaderboard_page(tmp_path):
    site = _site_copy(tmp_path)
    (site / "docs" / "leaderboard-imagenet.md").write_text("# Leaderboard: imagenet\n\nGenerated later by `harness report`.\n")
    ok = _build(site)
    assert ok.returncode == 0, ok.stderr
    assert (site / "out" / "leaderboard-imagenet" / "index.html").is_file()
    assert 'href="leaderboard-imagenet/"' in (site / "out" / "index.html").read_text()  # in the nav, by the hook
    with open(site / "docs" / "cost.md", "a") as f:
        f.write("\nSee [the store](store.md#no-such-section) and [a page](no-such-page.md).\n")
    bad = _build(site)
    assert bad.returncode != 0
    assert "no-such-page.md" in bad.stderr and "no-such-section" in bad.stderr


def test_a_threat_plugin_imports_from_harness_core_as_contributing_says(tmp_path, capsys):
    from harness.core import THREATS

    plugin = tmp_path / "my_threat.py"
    plugin.write_text(
        "from harness.core import ThreatModel, register_threat\n\n"
        "register_threat(ThreatModel(name='docs-blind-fgsm', description='one PGD step on the classifier alone',\n"
        "                            base=dict(attacks=('pgd',), steps=1, gradient_path='classifier', eval_draws=2),\n"
        "                            per_family={'digits': {'eps': 0.2, 'step_size': 0.2}}))\n")
    try:
        code = main(["run", "--plugin", str(plugin), "--threat", "docs-blind-fgsm", "--n-examples", "16",
                     "--db", str(tmp_path / "r.db"), "--json", "--no-progress"])
        assert code == 0, capsys.readouterr().err
        assert '"threat": "docs-blind-fgsm"' in capsys.readouterr().out
    finally:
        if "docs-blind-fgsm" in THREATS:
            THREATS.unregister("docs-blind-fgsm")
