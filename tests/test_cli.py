"""The CLI end to end: run --json, ls, results, show, errors as one line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.cli import main
from tests.conftest import TOY_PLUGIN


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_run_json_then_results_and_show(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    code, out, err = run_cli(["run", "--defense", "none", "--threat", "preprocessor-blind", "--n-examples", "40", "--db", db, "--json"],
                             capsys)
    assert code == 0, err
    j = json.loads(out)
    for k in ("job_id", "status", "defense", "threat", "dataset", "classifier", "n_examples", "clean_accuracy", "robust_accuracy"):
        assert k in j
    assert j["status"] == "done" and 0 <= j["robust_accuracy"] <= j["clean_accuracy"] <= 1
    assert "gradient path: classifier" in err  # the plan is printed (to stderr with --json)

    code, out, _ = run_cli(["results", "--db", db, "--format", "json"], capsys)
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["defense"] == "none"
    code, out, _ = run_cli(["results", "--db", db, "--format", "csv"], capsys)
    assert out.splitlines()[0].startswith("job_id,status,defense")
    code, out, _ = run_cli(["results", "--db", db], capsys)
    assert "preprocessor-blind" in out
    code, out, _ = run_cli(["show", j["job_id"][:10], "--db", db], capsys)
    shown = json.loads(out)
    assert shown["job_id"] == j["job_id"] and "environment" in shown and shown["metrics"]["clean_accuracy"]["n"] == 40

    # the same command again reuses the stored job
    code, out, _ = run_cli(["run", "--n-examples", "40", "--db", db, "--json"], capsys)
    assert json.loads(out)["reused"] is True


def test_plugin_defense_from_a_file(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    code, out, err = run_cli(
        ["run", "--plugin", TOY_PLUGIN, "--defense", "toy-noise", "--threat", "bpda", "--n-examples", "16",
         "--set", "steps=2", "--set", "eval_draws=3", "--db", db, "--json"], capsys)
    assert code == 0, err
    j = json.loads(out)
    assert j["defense"] == "toy-noise" and j["eval_draws"] == 3 and j["eot_samples"] == 4


def test_defense_setup_notes_are_printed_and_stored(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    code, out, err = run_cli(["run", "--plugin", TOY_PLUGIN, "--defense", "toy-slow", "--set", "delay=0.001", "--threat", "bpda",
                              "--n-examples", "8", "--set", "steps=1", "--db", db, "--json"], capsys)
    assert code == 0, err
    assert "note: toy-slow: sleeps 0.001 s per purification" in err
    code, out, _ = run_cli(["show", json.loads(out)["job_id"][:10], "--db", db], capsys)
    assert "toy-slow: sleeps 0.001 s per purification" in out


def test_ls_lists_everything(capsys):
    code, out, _ = run_cli(["ls"], capsys)
    assert code == 0
    for word in ("none", "preprocessor-blind", "bpda", "adaptive", "digits", "cifar10", "resnet20", "digits-cnn"):
        assert word in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "--defense", "nnoe"], "did you mean 'none'"),
        (["run", "--threat", "bdpa"], "did you mean 'bpda'"),
        (["run", "--set", "eps=5"], "out of range"),
        (["run", "--dataset", "cifar10"], "--data-dir"),
        (["run", "--plugin", "no_such_file.py"], "no_such_file.py"),
    ],
)
def test_errors_are_one_line_with_exit_2(args, needle, capsys, tmp_path):
    code, out, err = run_cli(args + ["--db", str(tmp_path / "r.db")], capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_console_script_is_installed(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "harness")
    proc = subprocess.run([exe, "ls", "threats"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "adaptive" in proc.stdout
