"""Issue 15: non-finite gradients stop a job, flags on weak numbers, paired comparisons (harness compare).

Small real runs on digits (16 examples, 2-3 attack steps) sharing one store.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from harness import evaluation as E
from harness.cli import main
from harness.core.registry import HarnessError
from harness.evaluation.flags import flag_names, not_converged
from harness.evaluation.stats import mcnemar_exact, paired_comparison, paired_table
from harness.store import Store
from tests.conftest import TOY_PLUGIN

N = 16


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _run(store, defense, threat, *over, dataset="digits", n=N):
    cfg = E.RunConfig(defense=defense, threat=threat, dataset=dataset, n_examples=n, overrides=tuple(over))
    return E.run_job(E.resolve(cfg), store, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    db = tmp_path_factory.mktemp("flags") / "r.db"
    store = Store(str(db))
    short = (("attacks", "pgd"), ("steps", "3"), ("also_paths", ""))
    out = {
        "short": _run(store, "none", "adaptive", *short),
        "blind": _run(store, "none", "preprocessor-blind", ("steps", "3")),
        "maep": _run(store, "maep", "preprocessor-blind", ("steps", "3")),
        "quantize": _run(store, "toy-quantize", "adaptive", ("attacks", "pgd,apgd-dlr"), ("steps", "2"), ("apgd_steps", "2"),
                         ("also_paths", "")),
        "hidden": _run(store, "toy-hidden-noise", "adaptive", *short),
        "smooth": _run(store, "toy-smooth", "adaptive", *short),
        "mnist": _run(store, "none", "preprocessor-blind", ("steps", "1"), dataset="mnist5k", n=8),
    }
    store.engine.dispose()
    return db, out


# --------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("attacks", ["pgd", "apgd-ce"])
def test_a_nan_gradient_ends_the_job_with_one_line_naming_the_defense_and_path(attacks, tmp_path, capsys):
    db = str(tmp_path / "r.db")
    code, _, err = run_cli(["run", "--plugin", TOY_PLUGIN, "--defense", "toy-nan-grad", "--threat", "adaptive",
                            "--n-examples", "8", "--set", f"attacks={attacks}", "--db", db], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "toy-nan-grad" in line and "full gradient path" in line and "non-finite" in line
    assert "Traceback" not in err
    job = Store(db, read_only=True).jobs()[0]
    assert job.status == "failed" and "toy-nan-grad" in job.reason


def test_pgd_refuses_a_nan_gradient_of_any_model():
    from harness.core.defense import DEFENSES
    from threat_models.attacks.pgd import pgd

    nan_grad = DEFENSES.get("toy-nan-grad").from_dict({})  # identity forward, NaN backward (tests/plugins)

    def model(x):  # a plain callable, not the engine's defended forward: pgd itself must refuse the gradient
        return nan_grad.purify(x).flatten(1)[:, :3]

    with pytest.raises(HarnessError, match="non-finite input gradients"):
        pgd(model, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), norm="linf", eps=0.1, steps=2, step_size=0.05)


def test_all_finite_is_exactly_isfinite_all():
    from harness.core.numerics import all_finite

    big = torch.full((4,), 3e38)  # finite values whose sum overflows: still finite
    cases = [torch.zeros(3), big, torch.empty(0), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]),
             torch.tensor([float("inf"), float("-inf")]), torch.rand(2, 3, requires_grad=True)]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


# --------------------------------------------------------------------------- flags
def test_not_converged_reads_the_last_tenth_of_the_curve():
    falling = [(1 - i / 20, 8) for i in range(21)]
    flat = [(max(0.5, 1 - i / 10), 8) for i in range(21)]
    assert [f["flag"] for f in not_converged({"pgd": falling})] == ["not_converged"]
    assert not_converged({"pgd": flat}) == [] and not_converged({"pgd": [(1.0, 8)]}) == []


def test_each_weak_number_is_flagged(runs):
    _, r = runs
    names = {k: set(flag_names(o.flags)) for k, o in r.items()}
    assert "not_converged" in names["short"] and "non_adaptive_only" not in names["short"]  # 3 PGD steps still falling
    assert "non_adaptive_only" in names["maep"]  # the classifier alone: the purifier never differentiated through
    assert "non_adaptive_only" not in names["blind"]  # for the identity purifier the classifier is the whole model
    assert {"zero_gradients", "autoattack"} <= names["quantize"]
    aa = [f["detail"] for f in r["quantize"].flags if f["flag"] == "autoattack"]
    assert any("apgd-dlr: there are" in d and "zero gradient" in d for d in aa)
    zero = next(f["detail"] for f in r["quantize"].flags if f["flag"] == "zero_gradients")
    assert zero.startswith(f"{N} of {N} examples") and "full path" in zero
    assert "randomness_detected" in names["hidden"]
    assert "randomness_detected" not in names["smooth"] and "zero_gradients" not in names["smooth"]
    assert all("randomness_detected" not in v for k, v in names.items() if k != "hidden")


def test_flags_round_trip_through_the_store_show_and_results(runs, capsys):
    db, r = runs
    store = Store(str(db), read_only=True)
    assert store.get_job(r["quantize"].job_id).flags == r["quantize"].flags
    assert r["quantize"].as_json()["flags"] == r["quantize"].flags
    code, out, _ = run_cli(["show", r["short"].job_id[:12], "--db", str(db)], capsys)
    assert code == 0 and json.loads(out)["flags"][0]["flag"] == "not_converged"
    code, out, _ = run_cli(["results", "--db", str(db), "--format", "json"], capsys)
    rows = {x["job_id"]: x for x in json.loads(out)}
    assert rows[r["hidden"].job_id[:12]]["flags"] == r["hidden"].flags
    code, out, _ = run_cli(["results", "--db", str(db)], capsys)
    assert "flags" in out.splitlines()[0] and "zero_gradients,autoattack" in out


def test_a_store_older_than_flags_is_read_then_migrated(runs, tmp_path, capsys):
    db, r = runs
    old = tmp_path / "old.db"
    src, dst = sqlite3.connect(str(db)), sqlite3.connect(str(old))
    src.backup(dst)
    src.close()
    dst.execute("ALTER TABLE jobs DROP COLUMN flags")
    dst.commit()
    dst.close()
    code, out, err = run_cli(["results", "--db", str(old), "--format", "csv"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].endswith(",flags") or ",flags," in out.splitlines()[0]
    assert Store(str(old), read_only=True).get_job(r["short"].job_id).flags is None
    code, out, _ = run_cli(["show", r["short"].job_id[:12], "--db", str(old)], capsys)
    assert code == 0 and json.loads(out)["flags"] is None
    Store(str(old)).engine.dispose()  # a writer adds the column (harness.store.migrate)
    assert "flags" in {row[1] for row in sqlite3.connect(str(old)).execute("PRAGMA table_info(jobs)")}


def test_a_store_older_than_every_added_column_is_read_by_every_reader(runs, tmp_path, capsys):
    """A store written before examples.reference and jobs.flags (harness.store.migrate): every read-only command,
    the paired comparison and the dashboard queries read it without adding anything.
    """
    from dashboard import queries as Q
    from harness.store.migrate import ADDED_COLUMNS

    db, r = runs
    old = tmp_path / "older.db"
    src, dst = sqlite3.connect(str(db)), sqlite3.connect(str(old))
    src.backup(dst)
    src.close()
    for table, column in ADDED_COLUMNS:
        dst.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    dst.commit()
    dst.close()
    before = old.read_bytes()
    a, b = r["blind"].job_id, r["maep"].job_id
    for args in (["results", "--db", str(old)], ["show", a[:12], "--db", str(old)], ["compare", a[:12], b[:12], "--db", str(old)],
                 ["ls"]):
        code, out, err = run_cli(args, capsys)
        assert code == 0 and "Traceback" not in err, (args, err)
    ex = Store(str(old), read_only=True).example_rows(a)
    assert len(ex) == N and all(e.reference is None for e in ex)
    engine = Q.make_engine(str(old))
    try:
        assert len(Q.load_jobs(engine)) == len(r)
        assert len(Q.job_examples(engine, a)) == N
        assert Q.compare_jobs(engine, a, b)["n_shared"] == N
        assert Q.job_detail(engine, a)["flags"] is None
    finally:
        engine.dispose()
    assert old.read_bytes() == before  # nothing was added or written


def test_check_fail_on_flags_lists_the_flagged_cells(runs, tmp_path, capsys):
    db, r = runs
    table = tmp_path / "t.csv"
    rob = r["short"].metrics["robust_accuracy"]["value"]
    table.write_text("defense,threat,dataset,classifier,metric,expected,tolerance,n_examples\n"
                     f"none,adaptive,digits,digits-cnn,robust_accuracy,{rob},0.001,{N}\n")
    code, out, _ = run_cli(["check", str(table), "--db", str(db)], capsys)
    assert code == 0 and "1/1 within tolerance" in out
    code, out, _ = run_cli(["check", str(table), "--db", str(db), "--fail-on-flags"], capsys)
    assert code == 1
    flagged = [ln for ln in out.splitlines() if ln.startswith("flagged")]
    assert len(flagged) == 1 and r["short"].job_id[:12] in flagged[0] and "not_converged" in flagged[0]
    assert "1/1 matched jobs flagged" in out


# --------------------------------------------------------------------------- paired comparisons
def test_mcnemar_exact_on_hand_computed_tables():
    assert mcnemar_exact(5, 1) == pytest.approx(14 / 64)  # 2 * (C(6,0) + C(6,1)) / 2^6
    assert mcnemar_exact(1, 5) == mcnemar_exact(5, 1)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(30, 12) == pytest.approx(0.0079159, abs=1e-7)  # scipy.stats.binomtest(12, 42).pvalue
    t = paired_table([1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 0])
    assert t == {"both": 2, "first_only": 1, "second_only": 2, "neither": 1}
    c = paired_comparison([1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 0])
    assert c["accuracy_first"] == pytest.approx(0.5) and c["accuracy_second"] == pytest.approx(4 / 6)
    assert c["difference"] == pytest.approx(1 / 6) and c["p_value"] == 1.0


def test_harness_compare_two_defenses_on_the_same_examples(runs, capsys):
    db, r = runs
    a, b = r["blind"], r["maep"]
    code, out, err = run_cli(["compare", a.job_id[:10], b.job_id[:10], "--db", str(db), "--json"], capsys)
    assert code == 0, err
    c = json.loads(out)
    assert c["n_shared"] == N and c["job_a"] == a.job_id
    for kind in ("robust", "clean"):
        t = c[kind]["table"]
        assert sum(t.values()) == N
        assert c[kind]["p_value"] == pytest.approx(mcnemar_exact(t["first_only"], t["second_only"]))
    assert c["robust"]["accuracy_first"] == pytest.approx(a.metrics["robust_accuracy"]["value"])
    assert c["robust"]["accuracy_second"] == pytest.approx(b.metrics["robust_accuracy"]["value"])
    code, out, _ = run_cli(["compare", a.job_id[:10], b.job_id[:10], "--db", str(db)], capsys)
    assert code == 0 and "exact McNemar p =" in out and f"{N} shared examples" in out and "B right" in out
    code, _, err = run_cli(["compare", a.job_id[:10], r["mnist"].job_id[:10], "--db", str(db)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "share no examples" in err
