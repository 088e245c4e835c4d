"""Start-up: the CLI and the default job's resolution import no heavy optional package; digits equals sklearn's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("sklearn", "scipy", "pandas", "ray", "streamlit", "robustbench", "diffusers")


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
        check=True, capture_output=True, text=True, env=env, cwd=ROOT,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_cli_and_default_resolve_import_no_heavy_package():
    mods = _modules_after(
        "from harness.cli import build_parser\n"
        "build_parser('run').parse_args(['run'])\n"
        "from harness.evaluation import RunConfig, resolve\n"
        "resolve(RunConfig(defense='none', threat='preprocessor-blind', dataset='digits'))"
    )
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_run_help_does_not_import_torch():
    mods = _modules_after("from harness.cli import build_parser\nbuild_parser('run')")
    assert "torch" not in mods and not mods & set(HEAVY)


def test_digits_equals_sklearn_load_digits():
    from sklearn.datasets import load_digits

    from harness import data as D

    assert D._digits_file() is not None  # read directly, not through scikit-learn
    data, target = D._digits_arrays()
    ref = load_digits()
    assert data.dtype == ref.data.dtype and np.array_equal(data, ref.data)
    assert np.array_equal(target, ref.target)
