"""Cost before running: the NFE a dry run predicts is the NFE the run records; calibration; the CLI lines."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.evaluation import RunConfig, resolve, run_job
from harness.evaluation.cost import calibrate, estimate_nfe, estimate_seconds
from harness.store import Store

SMALL = (("t_star", "0.04"), ("steps", "3"), ("eot_samples", "2"), ("eval_draws", "3"), ("apgd_steps", "2"))
KEYS = ("attack_purifications", "eval_purifications", "classifier_images", "purifier_nfe_images")


def _recorded(job) -> dict:
    store = Store("sqlite://")
    run_job(job, store, progress=False)
    return store.get_job(job.job_id).nfe


@pytest.mark.parametrize("threat", ["bpda", "preprocessor-blind"])
def test_dry_run_nfe_equals_the_recorded_nfe_of_a_one_attack_cell(threat):
    job = resolve(RunConfig(defense="diffpure", threat=threat, n_examples=4, overrides=SMALL))
    est = estimate_nfe(job)
    assert est["exact"] and est["nfe_per_purification"] == job.defense.nfe_per_call == 2
    if threat == "bpda":  # (steps + 1) x EOT x n through the purifier, draws x n twice to score
        assert est["attack_purifications"] == 4 * 2 * 4 and est["eval_purifications"] == 2 * 3 * 4
    rec = _recorded(job)
    assert {k: est[k] for k in KEYS} == {k: rec[k] for k in KEYS}


def test_dry_run_nfe_bounds_a_cascaded_cell():
    job = resolve(RunConfig(defense="diffpure", threat="adaptive", n_examples=4, overrides=SMALL))
    est = estimate_nfe(job)
    assert not est["exact"] and len(est["attacks"]) == len(job.plan.attacks) > 1
    rec = _recorded(job)
    # PGD runs on every example first, so its share is exact; the cascade only removes work after it
    assert est["attacks"][0]["purifications"] == 4 * 2 * 4
    for k in KEYS:
        assert est[k] >= rec[k] > 0


def test_calibration_gives_a_positive_time_estimate():
    job = resolve(RunConfig(defense="diffpure", threat="bpda", n_examples=4, overrides=SMALL))
    cal = calibrate(job, batch=4, repeats=1)
    assert cal.defended_s > 0 and set(cal.defended_grad_s) == {"bpda"} and cal.classify_grad_s > 0
    assert estimate_seconds(estimate_nfe(job), cal) > 0


def test_run_dry_run_prints_the_nfe_and_json_holds_it(capsys):
    argv = ["run", "--defense", "diffpure", "--threat", "bpda", "--n-examples", "4", "--dry-run"]
    argv += [a for k, v in SMALL for a in ("--set", f"{k}={v}")]
    assert main(argv + ["--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "network evaluations: 32 attack + 24 scoring + 4 flag-check purifications x 2 NFE = 120 purifier NFE-images" in out
    assert "estimated network time on cpu" in out
    assert main(argv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["status"] == "planned" and got["cost"]["purifier_nfe_images"] == 120


def test_grid_dry_run_prints_every_cell_and_the_total(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("name: t\nn_examples: 4\nseeds: [0]\nset: {steps: 3, eot_samples: 2, eval_draws: 3}\n"
                    "defenses:\n  - name: diffpure\n    set: {t_star: 0.04}\nthreats: [bpda, preprocessor-blind]\n"
                    "datasets: [digits]\n")
    assert main(["grid", str(grid), "--dry-run", "--db", str(tmp_path / "r.db"), "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert out.count("        nfe: ") == 2 and "= 120 purifier NFE-images" in out
    assert "total to run: 2 cells, 168 purifier NFE-images" in out and "device-hours on cpu" in out
    assert not (tmp_path / "r.db").exists()


def test_dry_run_nfe_of_a_paired_reference_cell_equals_the_recorded_nfe():
    job = resolve(RunConfig(defense="diffpure", threat="color-shift", dataset="digits", n_examples=4,
                            overrides=(("t_star", "0.04"), ("steps", "2"), ("eval_draws", "2"), ("shift", "brightness"))))
    est = estimate_nfe(job)
    assert est["exact"] and est["reference_purifications"] == est["eval_purifications"] > 0
    rec = _recorded(job)
    assert {k: est[k] for k in (*KEYS, "reference_purifications")} == {k: rec[k] for k in (*KEYS, "reference_purifications")}


def test_a_large_plan_says_what_it_costs_before_it_starts(tmp_path, monkeypatch, capsys):
    import harness.evaluation.cost as cost

    args = ["run", "--defense", "toy-noise", "--threat", "bpda", "--set", "steps=1", "--n-examples", "8",
            "--plugin", "tests/plugins/toy_defenses.py", "--db", str(tmp_path / "r.db"), "--no-progress"]
    job_nfe = estimate_nfe(resolve(RunConfig(defense="toy-noise", threat="bpda", n_examples=8, overrides=(("steps", "1"),))))
    monkeypatch.setattr(cost, "LARGE_PLAN_NFE", job_nfe["purifier_nfe_images"] + 1)  # just above this cell: no line
    assert main(args) == 0
    assert "large plan" not in capsys.readouterr().out
    monkeypatch.setattr(cost, "LARGE_PLAN_NFE", job_nfe["purifier_nfe_images"])  # this cell is large now
    assert main(args + ["--force"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "large plan:" in x)
    assert f"{job_nfe['purifier_nfe_images']:,} purifier NFE-images" in line and "estimated network time" in line
    assert out.index("large plan:") < out.index("done:")  # before the run, not after
