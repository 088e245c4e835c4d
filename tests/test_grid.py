"""Grids: parsing errors with lines, expansion, skip/resume, SIGKILL-resume, Ray, reuse, checks."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from harness.cli import main
from harness.core.registry import HarnessError
from harness.scheduler import GridError, expand, load_grid, run_grid
from harness.store import Store
from harness.store.schema import ExampleRow
from tests.conftest import TOY_PLUGIN

GRID = f"""
name: t
n_examples: 40
set: {{batch_size: 16}}
plugins: [{TOY_PLUGIN}]
defenses: [none, toy-smooth, toy-noise]
threats:
  - preprocessor-blind
  - name: bpda
    set: {{steps: 3}}
  - name: adaptive
    set: {{steps: 3, apgd_steps: 3, gradient_path: surrogate}}
datasets: [digits]
"""


def write(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("select job_id, position, clean_preds, adv_preds, linf from examples order by job_id, position").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize(
    "text,needle",
    [
        ("defenses: [none]\nthreats: [bpda]\ndatasets: [digits]\nthreads: 3\n", "line 4: unknown key 'threads'; did you mean 'threats'?"),
        ("defenses: [none]\nthreats: [bpda]\n", "missing required key 'datasets'"),
        ("defenses: [none]\nthreats: [bpda\ndatasets: [digits]\n", "invalid YAML"),
        ("defenses: [none]\nthreats:\n  - name: bpda\n    sett: {steps: 2}\ndatasets: [digits]\n", "line 4: unknown key 'sett'"),
        ("defenses: [none]\nthreats: [bpda]\ndatasets: [digits]\nn_examples: -3\n", "line 4: n_examples must be a positive integer"),
        ("defenses: none\nthreats: [bpda]\ndatasets: [digits]\n", "line 1: 'defenses' must be a non-empty list"),
        ("- a\n- b\n", "a grid file is a mapping"),
        ("defenses:\n  - {name: none, n_examples: {bpdaa: 4}}\nthreats: [bpda]\ndatasets: [digits]\n",
         "line 2: n_examples names threat 'bpdaa', which is not in the grid's threats; did you mean 'bpda'?"),
        ("defenses:\n  - {name: none, n_examples: {bpda: 0}}\nthreats: [bpda]\ndatasets: [digits]\n",
         "line 2: n_examples must be a positive integer or a mapping"),
    ],
)
def test_malformed_grid_files_name_key_and_line(tmp_path, text, needle):
    with pytest.raises(GridError) as e:
        load_grid(write(tmp_path, text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_defense_sets_its_own_subset_size_per_threat(tmp_path):
    # the defense's size for a threat wins, then its size for all threats, then the threat's, the dataset's, the grid's
    text = ("n_examples: 40\ndefenses:\n  - none\n  - {name: toy-noise, n_examples: {bpda: 4}}\n"
            "  - {name: toy-slow, n_examples: 6}\nthreats:\n  - bpda\n  - {name: preprocessor-blind, n_examples: 12}\n"
            f"datasets: [digits]\nplugins: [{TOY_PLUGIN}]\n")
    n = {(c.defense, c.threat): c.n_examples for c in expand(load_grid(write(tmp_path, text)))}
    assert n == {("none", "bpda"): 40, ("none", "preprocessor-blind"): 12, ("toy-noise", "bpda"): 4,
                 ("toy-noise", "preprocessor-blind"): 12, ("toy-slow", "bpda"): 6, ("toy-slow", "preprocessor-blind"): 6}


def test_expansion_is_the_product_of_axes(tmp_path):
    spec = load_grid(write(tmp_path, GRID.replace("seeds", "") + "seeds: [0, 1]\n"))
    cfgs = expand(spec)
    assert len(cfgs) == 3 * 3 * 1 * 2
    bp = [c for c in cfgs if c.threat == "bpda"][0]
    assert ("batch_size", "16") in bp.overrides and ("steps", "3") in bp.overrides


def test_planning_loads_each_network_once_and_changes_no_identity(tmp_path):
    from harness.evaluation import resolve
    from harness.scheduler.cells import plan

    spec = load_grid(write(tmp_path, GRID))
    cells = [c for c in plan(spec, None) if c.job is not None]
    by = {}
    for c in cells:
        by.setdefault(c.cfg.defense, []).append(c.job)
    for name, jobs in by.items():
        assert len(jobs) >= 2 and len({id(j.defense) for j in jobs}) == 1, name  # one set-up defense per config
    assert len({id(c.job.classifier) for c in cells}) == 1
    assert len({id(j[0].defense) for j in by.values()}) == len(by)  # different defenses are not shared
    for c in cells[:3]:  # the same identities as resolving alone, each with its own networks
        alone = resolve(c.cfg)
        assert alone.job_id == c.job_id and alone.defense is not c.job.defense


def test_grid_runs_skips_and_is_idempotent(tmp_path, capsys):
    g = write(tmp_path, GRID.replace("gradient_path: surrogate", "gradient_path: adjoint"))
    db = str(tmp_path / "r.db")
    assert main(["grid", str(g), "--db", db, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("  run ") == 6 and out.count("  skip ") == 3 and "no 'adjoint' gradient path" in out
    # a cell's label carries its axis overrides (not the grid-wide set), so cells of one threat differ
    assert "none x bpda x digits x default x seed 0 [steps=3]  (linf eps=0.2)\n" in out and "batch_size" not in out
    assert "none x preprocessor-blind x digits x default x seed 0  (linf eps=0.2)\n" in out
    assert main(["grid", str(g), "--db", db]) == 0
    out = capsys.readouterr().out
    assert "summary: ran 6, skipped 3" in out
    st = Store(db)
    skipped = st.jobs(status="skipped")
    assert len(skipped) == 3 and all("adjoint" in j.reason for j in skipped)
    n_rows = len(rows(Path(db)))
    assert main(["grid", str(g), "--db", db]) == 0
    assert "summary: done 6, skipped 3" in capsys.readouterr().out
    assert len(rows(Path(db))) == n_rows == 6 * 40


SIGKILL_GRID = f"""
n_examples: 80
set: {{batch_size: 16}}
plugins: [{TOY_PLUGIN}]
defenses:
  - toy-noise
  - name: toy-slow  # about 1 s per batch, so the poll below always sees the grid mid-job
    set: {{delay: 0.05}}
threats:
  - name: bpda
    set: {{steps: 10, eot_samples: 2}}
datasets: [digits]
"""


def stored_rows(db: str) -> list[tuple]:
    """The examples of a store (a SQLite path or a server URL) as decoded values, in (job, position) order."""
    e = ExampleRow.__table__
    st = Store(db, read_only=True)
    try:
        with st.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(e.c.job_id, e.c.position, e.c.clean_preds, e.c.adv_preds, e.c.linf)
                                                   .order_by(e.c.job_id, e.c.position))]
    finally:
        st.close()


@pytest.fixture(scope="module")
def sigkill_reference(tmp_path_factory) -> list[tuple]:
    """The rows of the uninterrupted SIGKILL_GRID (a SQLite store)."""
    folder = tmp_path_factory.mktemp("reference")
    g, ref_db = write(folder, SIGKILL_GRID), folder / "ref.db"
    subprocess.run([sys.executable, "-m", "harness.cli", "grid", str(g), "--db", str(ref_db)], check=True, capture_output=True,
                   timeout=900)
    return stored_rows(str(ref_db))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_grid_then_rerun_gives_exactly_the_uninterrupted_rows(backend, tmp_path, request, sigkill_reference):
    g = write(tmp_path, SIGKILL_GRID)
    db = str(tmp_path / "killed.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    exe = [sys.executable, "-m", "harness.cli", "grid", str(g)]
    reference = sigkill_reference

    proc = subprocess.Popen(exe + ["--db", db], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            n = len(stored_rows(db))
        except (HarnessError, sqlite3.OperationalError):  # not created yet
            continue
        if n >= 80 + 16:  # one job done and part of the next: kill mid-job
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = n
            break
    proc.wait(timeout=30)
    assert killed_at is not None and killed_at < len(reference), "the grid finished before it could be killed"
    assert any(j.status == "running" for j in Store(db, read_only=True).jobs())  # a job was interrupted mid-way
    subprocess.run(exe + ["--db", db], check=True, capture_output=True, timeout=900)
    assert stored_rows(db) == reference
    assert all(j.status in ("done", "skipped") for j in Store(db, read_only=True).jobs())


def test_a_grid_killed_during_force_keeps_the_old_rows(tmp_path):
    """--force recomputes a finished cell in memory and swaps its rows only when it has finished."""
    text = f"""
n_examples: 48
set: {{batch_size: 16}}
plugins: [{TOY_PLUGIN}]
defenses:
  - toy-noise
  - name: toy-slow  # seconds per job, so the kill below lands mid-job
    set: {{delay: 0.1}}
threats:
  - name: bpda
    set: {{steps: 10, eot_samples: 2}}
datasets: [digits]
"""
    g = write(tmp_path, text)
    db = tmp_path / "r.db"
    exe = [sys.executable, "-u", "-m", "harness.cli", "grid", str(g), "--db", str(db)]
    subprocess.run(exe, check=True, capture_output=True, timeout=600)
    reference = rows(db)
    finished = {j.id: j.finished_at for j in Store(str(db)).jobs()}

    proc = subprocess.Popen(exe + ["--force"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip().startswith("done") and "toy-noise" in line:  # the first cell was redone; the slow one is running
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert not any("toy-slow" in line and line.strip().startswith("done") for line in seen), "killed too late"
    st = Store(str(db))
    assert all(j.status == "done" for j in st.jobs())
    assert rows(db) == reference  # nothing was lost, and the redone cell reproduced its rows
    redone = [j for j in st.jobs() if j.finished_at != finished[j.id]]
    assert [j.defense for j in redone] == ["toy-noise"]


def test_ray_executor_matches_local(tmp_path):
    pytest.importorskip("ray")
    g = write(tmp_path, GRID)
    a, b = tmp_path / "local.db", tmp_path / "ray.db"
    run_grid(load_grid(g), Store(str(a)), log=lambda *_: None)
    summary = run_grid(load_grid(g), Store(str(b)), executor="ray", ray_cpus=2, log=lambda *_: None)
    assert summary.counts() == {"ran": 7, "skipped": 2}  # none and toy-noise have no surrogate path
    assert rows(a) == rows(b)


def _writer(db: str, wid: int, n: int) -> None:
    st = Store(db)
    for k in range(n):
        jid = f"w{wid}-{k}"
        st.begin_job(jid, defense="none", threat="bpda", dataset="digits", classifier="c", seed=0, n_examples=2, identity={}, config={})
        ex = [dict(position=i, dataset_index=i, label=0, clean_preds=[0], adv_preds={"pgd": [0]}, worst_attack=None, linf=0.0, l2=0.0,
                   clean_single=True, clean_majority=True, clean_worst=True, robust_single=True, robust_majority=True,
                   robust_worst=True, detect_clean=None, detect_adv=None) for i in range(2)]
        st.write_batch(jid, 0, examples=ex, curves={}, nfe={}, seconds=0.0)
        st.finish_job(jid, metrics={"m": (1.0, None, None, 2)}, curves={}, timings={}, nfe={}, environment={})


def test_concurrent_writers_lose_nothing(tmp_path):
    db = str(tmp_path / "c.db")
    Store(db)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    con = sqlite3.connect(db)
    assert con.execute("select count(*) from jobs where status='done'").fetchone()[0] == 100
    assert con.execute("select count(*) from examples").fetchone()[0] == 200
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"


def _table(path: Path, rows_: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["defense", "threat", "dataset", "classifier", "metric", "expected", "tolerance"])
        w.writeheader()
        w.writerows(rows_)
    return path


def test_check_passes_on_matching_table_and_fails_when_shifted(tmp_path, capsys):
    g = write(tmp_path, GRID)
    db = str(tmp_path / "r.db")
    run_grid(load_grid(g), Store(db), log=lambda *_: None)
    st = Store(db)
    good, shifted = [], []
    for j in st.jobs(status="done"):
        v = st.metrics(j.id)["robust_accuracy"].value
        key = dict(defense=j.defense, threat=j.threat, dataset=j.dataset, classifier=j.classifier, metric="robust_accuracy")
        good.append({**key, "expected": v, "tolerance": ""})
        shifted.append({**key, "expected": min(1.0, v + 0.4) if v < 0.5 else v - 0.4, "tolerance": ""})
    assert main(["check", str(_table(tmp_path / "good.csv", good)), "--db", db]) == 0
    assert f"{len(good)}/{len(good)} within tolerance" in capsys.readouterr().out and len(good) == 7
    assert main(["check", str(_table(tmp_path / "bad.csv", shifted)), "--db", db]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0/7 within tolerance" in out
    # an explicit tolerance, and a row nothing matches
    tol = [{**good[0], "expected": good[0]["expected"] + 0.01, "tolerance": "0.02"},
           {**good[0], "defense": "nonexistent", "tolerance": "0.5"}]
    assert main(["check", str(_table(tmp_path / "tol.csv", tol)), "--db", db]) == 1
    out = capsys.readouterr().out
    assert "1/2 within tolerance" in out and "no finished job matches" in out


def test_check_rejects_malformed_tables(tmp_path, capsys):
    p = tmp_path / "t.csv"
    p.write_text("defense,threat\nnone,bpda\n")
    assert main(["check", str(p), "--db", str(tmp_path / "r.db")]) == 2
    assert "missing column" in capsys.readouterr().err
    p.write_text("defense,threat,dataset,classifier,metric,expected,tolerance\nnone,bpda,digits,c,m,abc,\n")
    assert main(["check", str(p), "--db", str(tmp_path / "r.db")]) == 2
    assert "line 2: expected='abc' is not a number" in capsys.readouterr().err


# --------------------------------------------------------------------------- mistakes stop a grid; skipped = cannot run here
BASE = "n_examples: 8\ndefenses: [none]\nthreats: [bpda]\ndatasets: [digits]\n"


@pytest.mark.parametrize(
    "text,line,needle",
    [
        (BASE.replace("[none]", "[nnoe]"), 2, "defenses: unknown defense 'nnoe'; did you mean 'none'?"),
        (BASE.replace("[bpda]", "[adaptiv]"), 3, "unknown threat 'adaptiv'; did you mean 'adaptive'?"),
        (BASE.replace("[digits]", "\n  - digit"), 5, "unknown dataset 'digit'; did you mean 'digits'?"),
        (BASE.replace("[none]", "\n  - none\n    maep"), 3, "put each entry on its own '- ' line"),
        (BASE + "classifiers:\n  - name: resnet2O\n", 6, "unknown classifier 'resnet2O'"),
        (BASE + "plugins: [no_such_plugin.py]\n", 5, "plugin file"),
        (BASE + "set: {epss: 0.1}\n", 5, "--set epss: unknown option; did you mean 'eps'?"),
        (BASE + "set:\n  batch_size: 4\n  steps: abc\n", 7, "steps='abc' is not a valid int"),
        (BASE + "set: {eps: 5}\n", 5, "eps=5.0 is out of range"),
        (BASE.replace("[none]", "\n  - none\n  - name: maep\n    set: {tile: of}"), 5, "tile='of'"),
        (BASE + "threats: [adaptive]\n", 5, "duplicate key 'threats' (first given on line 3)"),
        (BASE.replace("[bpda]", "\n  - name: bpda\n    set: {steps: 2, steps: 3}"), 5, "duplicate key 'steps'"),
        (BASE + "data_seed: -1\n", 5, "data_seed must be one integer in 0..4294967295"),
        (BASE + "data_seeds: [0, 0]\n", 5, "data_seeds lists a seed twice"),
        (BASE + "data_seeds: [0, -2]\n", 5, "data_seeds must be integers in 0..4294967295 (got -2)"),
        (BASE + "data_seed: 0\ndata_seeds: [1]\n", 5, "give 'data_seeds' or 'data_seed', not both"),
        (BASE + "# caf\xe9\n", 5, "not UTF-8 text"),
    ],
)
def test_a_mistake_in_a_grid_stops_it_before_anything_runs(tmp_path, capsys, text, line, needle):
    g = tmp_path / "g.yaml"
    g.write_bytes(text.encode("latin-1"))  # the last case: a byte that is not UTF-8
    db = tmp_path / "r.db"
    st = Store(str(db))
    st.record_skip("old", "kept", defense="none", threat="bpda", dataset="digits", classifier="c", seed=0, n_examples=1,
                   identity={}, config={})
    st.close()
    before = db.read_bytes()
    assert main(["grid", str(g), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {g}: line {line}: ") and needle in err and err.count("\n") == 1, err
    assert db.read_bytes() == before and [j.id for j in Store(str(db)).jobs()] == ["old"]


def test_only_valid_cells_that_cannot_run_here_are_skipped(tmp_path, capsys):
    """An incompatible pair (a stochastic defense under AutoAttack-standard), missing weights (no
    consistency model for CMAP on mnist5k) and a missing data folder are skipped with the reason, and counted.
    """
    text = f"""
n_examples: 8
plugins: [{TOY_PLUGIN}]
defenses: [none, toy-noise, cmap]
threats:
  - preprocessor-blind
  - name: bpda
    set: {{attacks: autoattack-standard, apgd_steps: 2}}
datasets:
  - digits
  - mnist5k
  - name: cifar10
    data_dir: {tmp_path / "no-such-cifar"}
classifiers:
  - name: resnet20
    weights: {tmp_path / "no-such-resnet20.th"}
    datasets: [cifar10]
"""
    g = write(tmp_path, text)
    db = tmp_path / "r.db"
    assert main(["grid", str(g), "--db", str(db), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not db.exists()  # a dry run creates no store
    reasons = {line.split("  ")[3].split(" x seed")[0]: line for line in out.splitlines() if line.startswith("  skip ")}
    assert "has no EOT" in reasons["toy-noise x bpda x digits x default"]
    assert "mnist5k-cm.pt" in reasons["cmap x preprocessor-blind x mnist5k x default"]
    assert "no-such-cifar' does not exist" in reasons["none x preprocessor-blind x cifar10 x resnet20"]
    assert "has no EOT" in reasons["cmap x bpda x digits x default"]  # CMAP is stochastic too
    assert out.rstrip().endswith("summary: pending 7, skipped 11")


def test_workers_starting_together_compute_a_shared_attack_once(tmp_path, capsys):
    """Three defenses under preprocessor-blind on two local workers: one runs the attack, two reuse it."""
    g = write(tmp_path, """
n_examples: 64
seeds: [0]
set: {batch_size: 32, threat.steps: 400, eval_draws: 1}
defenses: [none, maep, flowpure-pgd]
threats: [preprocessor-blind]
datasets: [digits]
""")
    db = str(tmp_path / "r.db")
    assert main(["grid", str(g), "--db", db, "--devices", "cpu,cpu", "--threads", "1"]) == 0
    jobs = Store(db, read_only=True).jobs()
    assert len(jobs) == 3 and all(j.status == "done" for j in jobs)
    reused = sorted(j.nfe["adv_reused"] for j in jobs)
    assert reused == [0, 2, 2], reused  # two batches each: computed once, reused by the two others
    # (400 steps: long enough that without the ordering both workers would attack at once)


def test_data_seeds_are_cells_and_results_report_and_dashboard_show_mean_and_spread(tmp_path, capsys):
    from dashboard import queries as Q

    g = write(tmp_path, f"""
n_examples: 8
seeds: [0, 1]
data_seeds: [0, 1, 2]
plugins: [{TOY_PLUGIN}]
defenses: [toy-noise]
threats:
  - name: bpda
    set: {{steps: 1, eot_samples: 1, eval_draws: 1}}
datasets: [digits]
""")
    db = str(tmp_path / "r.db")
    assert main(["grid", str(g), "--db", db, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "x 3 data seeds x 2 seeds" in out and "toy-noise x bpda x digits x default x data_seed 2 x seed 1 [" in out
    run_grid(load_grid(g), Store(db), log=lambda *_: None)
    jobs = Store(db, read_only=True).jobs(status="done")
    assert sorted((j.config["data_seed"], j.seed) for j in jobs) == [(d, s) for d in range(3) for s in range(2)]
    assert main(["results", "--db", db, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    robust = [r["robust"] for r in rows]
    mean, sd = statistics.fmean(robust), statistics.stdev(robust)
    assert all(r["seeds_n"] == 6 and math.isclose(r["seeds_mean"], mean, rel_tol=1e-12)
               and math.isclose(r["seeds_sd"], sd, rel_tol=1e-9) for r in rows)
    lb = Q.leaderboard(Q.load_jobs(Q.make_engine(db)))
    assert lb["robust:bpda:seeds"].tolist() == [6] and math.isclose(lb["robust:bpda:mean"][0], mean, rel_tol=1e-12)
    assert f"over 6 seeds {100 * mean:.1f} ± {100 * sd:.1f}" in Q.display_table(lb)["Robust: bpda"][0]
    assert main(["report", "--db", db]) == 0
    assert f"over 6 seeds {100 * mean:.1f} ± {100 * sd:.1f}" in capsys.readouterr().out


def test_a_file_gone_between_planning_and_start_fails_its_cells_not_the_grid(tmp_path, capsys):
    from harness.scheduler.cells import plan

    weights = Path(__file__).resolve().parents[1] / "harness" / "weights"
    clf = tmp_path / "digits-cnn.pt"
    for suffix in (".pt", ".json"):
        clf.with_suffix(suffix).write_bytes((weights / f"digits-cnn{suffix}").read_bytes())
    g = write(tmp_path, f"n_examples: 8\ndefenses: [none]\nthreats: [preprocessor-blind]\ndatasets: [digits]\n"
                        f"seeds: [0, 1]\nclassifiers:\n  - name: digits-cnn\n    weights: {clf}\n")
    spec = load_grid(g)
    cells = plan(spec, None)
    clf.unlink()  # planned with it; gone when the grid starts the cells
    summary = run_grid(spec, Store(str(tmp_path / "r.db")), cells=cells, log=print)
    assert summary.counts() == {"failed": 2}  # each cell fails with the reason, and the grid ends
    failed = Store(str(tmp_path / "r.db"), read_only=True).jobs(status="failed")
    assert len(failed) == 2 and all("when it was started" in j.reason and str(clf) in j.reason for j in failed)
    assert "FAILED" in capsys.readouterr().out
