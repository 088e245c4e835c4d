"""CI's CIFAR-10 regression slice: grids/smoke-cifar10.yaml through the CLI, checked against tables/smoke-cifar10.csv.

Every shipped CIFAR-10 purifier under preprocessor-blind and bpda (and flowpure-pgd under
adaptive) on 16 exact test images with the shared ResNet-20. A change in a purifier's code,
its weights or its loader moves a number outside the stored 95% interval and fails here.
A separate grid from grids/smoke.yaml so that pytest-xdist runs the two beside each other.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from harness.store import Store

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "grids" / "smoke-cifar10.yaml"
TABLE = ROOT / "tables" / "smoke-cifar10.csv"
PURIFIERS = {"diffpure", "diffpure-ddpm", "coup", "cmap", "flowpure-pgd", "flowpure-cw", "flowpure-gauss", "maep"}


def _grid_for(shared: Path, tmp_path: Path) -> Path:
    """The grid with its ../shared paths pointing at $HARNESS_SHARED (the committed file assumes ../shared)."""
    text = GRID.read_text().replace("../shared/", f"{shared.resolve()}/")
    out = tmp_path / GRID.name
    out.write_text(text)
    return out


def test_table_covers_every_cifar_purifier_under_both_threats():
    rows = list(csv.DictReader(TABLE.open()))
    cells = {(r["defense"], r["threat"]) for r in rows if r["dataset"] == "cifar10"}
    for d in PURIFIERS | {"none"}:
        assert {(d, "preprocessor-blind"), (d, "bpda")} <= cells, d
    assert ("flowpure-pgd", "adaptive") in cells


def test_cifar10_slice_matches_its_accuracy_table(tmp_path, shared_dir):
    if shared_dir is None:
        from tests.conftest import _missing
        _missing("HARNESS_SHARED is not set (the CIFAR-10 images and the ResNet-20 live there)")
    if not (shared_dir / "data" / "cifar10_test_first1017.npz").exists():
        pytest.fail(f"{shared_dir}/data/cifar10_test_first1017.npz is missing")
    db = str(tmp_path / "smoke-cifar10.db")
    cli = [sys.executable, "-m", "harness.cli"]
    grid = subprocess.run(cli + ["grid", str(_grid_for(shared_dir, tmp_path)), "--db", db, "--threads", "1"],
                          capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert grid.returncode == 0, grid.stdout + grid.stderr
    assert "FAILED" not in grid.stdout and "skipped " not in grid.stdout, grid.stdout
    check = subprocess.run(cli + ["check", str(TABLE), "--db", db], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr

    # every purifier ran with its shipped CIFAR-10 weights; the adaptive cell is never weaker than preprocessor-blind
    robust = {(r["defense"], r["threat"]): r["robust"] for r in Store(db).results_table()}
    assert {d for d, _ in robust} == PURIFIERS | {"none"}
    assert robust[("flowpure-pgd", "adaptive")] <= robust[("flowpure-pgd", "preprocessor-blind")]
