"""CI's regression check: run grids/smoke.yaml through the CLI and check tables/smoke.csv.

The table's expected numbers come from a run of the same grid; the default tolerance is
each stored result's 95% interval, so numerical noise across machines passes while a
real change in a defense, an attack or the scoring fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.store import Store

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_grid_matches_its_accuracy_table(tmp_path):
    db = str(tmp_path / "smoke.db")
    cli = [sys.executable, "-m", "harness.cli"]
    # one single-threaded worker (one thread is what a loaded 2-core machine runs fastest; the
    # other core runs the rest of the suite, whose process-timing tests need it)
    args = ["grid", str(ROOT / "grids" / "smoke.yaml"), "--db", db, "--threads", "1"]
    grid = subprocess.run(cli + args, capture_output=True, text=True, timeout=2400)
    assert grid.returncode == 0, grid.stdout + grid.stderr
    assert "FAILED" not in grid.stdout
    check = subprocess.run(cli + ["check", str(ROOT / "tables" / "smoke.csv"), "--db", db], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr

    # the adaptive cell is never weaker than the attacker who ignores the purifier; for
    # the purifiers (not the undefended classifier) it must be strictly stronger on digits
    robust = {(r["defense"], r["threat"]): r["robust"] for r in Store(db).results_table() if r["dataset"] == "digits"}
    defenses = {d for d, t in robust if t == "adaptive" and (d, "preprocessor-blind") in robust}
    assert {"diffpure", "diffpure-ddpm", "coup", "maep", "flowpure-pgd"} <= defenses
    for d in defenses:
        blind, adaptive = robust[(d, "preprocessor-blind")], robust[(d, "adaptive")]
        assert adaptive <= blind, (d, adaptive, blind)
        if d != "none":
            assert adaptive < blind, (d, adaptive, blind)
