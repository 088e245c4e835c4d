"""The leaderboard (issue 5): queries on a temporary store, the page through Streamlit's
AppTest, and the real server loaded in headless Chromium (dashboard/install_browser.sh).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from dashboard import queries as Q
from harness.evaluation.stats import wilson_interval
from harness.store import Store

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")

# (defense, threat, dataset) -> robust accuracy; threat -> (gradient path, EOT, adaptive)
THREATS = {"preprocessor-blind": ("classifier", 1, False), "bpda": ("bpda", 4, False), "adaptive": ("full", 4, True)}
ROBUST = {
    ("none", "preprocessor-blind", "digits"): 0.10,
    ("none", "bpda", "digits"): 0.05,
    ("none", "adaptive", "digits"): 0.0,
    ("toy-noise", "preprocessor-blind", "digits"): 0.80,
    ("toy-noise", "bpda", "digits"): 0.55,
    ("toy-noise", "adaptive", "digits"): 0.35,
    ("toy-quantize", "preprocessor-blind", "digits"): 0.90,
    ("toy-quantize", "bpda", "digits"): 0.70,  # only non-adaptive threats finished for it
    ("none", "preprocessor-blind", "mnist5k"): 0.15,
    ("toy-noise", "adaptive", "mnist5k"): 0.45,
}
CLEAN = {"none": 1.0, "toy-noise": 0.9, "toy-quantize": 0.95}
N = 20


def _job_id(defense: str, threat: str, dataset: str) -> str:
    return f"{defense}-{threat}-{dataset}".ljust(64, "0")


def fill_store(path: Path) -> Store:
    """Fabricated jobs written through the Store API, as the engine writes them."""
    st = Store(str(path))
    rng = np.random.default_rng(0)
    for (defense, threat, dataset), acc in ROBUST.items():
        path_, eot, adaptive = THREATS[threat]
        stochastic = defense == "toy-noise"
        draws = 10 if stochastic else 1
        jid = _job_id(defense, threat, dataset)
        st.begin_job(
            jid, defense=defense, threat=threat, dataset=dataset, classifier=f"{dataset}-cnn", seed=0, n_examples=N,
            norm="linf", eps=0.2, gradient_path=path_, eot_samples=eot if stochastic else 1, eval_draws=draws,
            stochastic=stochastic, adaptive=adaptive,
            identity={"defense": {"name": defense}, "threat": {"name": threat}, "seed": 0},
            config={"defense": defense, "threat": threat, "threat_spec": {"eps": 0.2, "steps": 5}},
        )
        k_rob, k_clean = round(acc * N), round(CLEAN[defense] * N)
        examples, samples = [], []
        for pos in range(N):
            label = pos % 10
            ok_clean, ok_rob = pos < k_clean, pos < k_rob
            examples.append(dict(
                position=pos, dataset_index=100 + pos, label=label, clean_preds=[label if ok_clean else (label + 1) % 10] * draws,
                adv_preds={"pgd": [label if ok_rob else (label + 3) % 10] * draws}, worst_attack=None if ok_rob else "pgd",
                linf=0.2, l2=1.1, clean_single=ok_clean, clean_majority=ok_clean, clean_worst=ok_clean,
                robust_single=ok_rob, robust_majority=ok_rob, robust_worst=ok_rob, detect_clean=None, detect_adv=None,
            ))
            if pos < 4:
                clean = rng.integers(0, 256, size=(1, 8, 8), dtype=np.uint8)
                adv = np.clip(clean.astype(int) + rng.integers(-51, 52, size=clean.shape), 0, 255).astype(np.uint8)
                samples.append({"position": pos, "images": {"clean": clean, "adversarial": adv, "purified": adv // 2}})
        curve = [N - round((N - k_rob) * min(1.0, i / 3)) for i in range(6)]
        st.write_batch(jid, 0, examples=examples, curves={"pgd": curve}, nfe={"attack_purifications": 100 * eot},
                       seconds=0.5, samples=samples)
        metrics = {}
        for name, k in (("clean_accuracy", k_clean), ("robust_accuracy", k_rob), ("robust_accuracy_pgd", k_rob)):
            lo, hi = wilson_interval(k, N)
            metrics[name] = (k / N, lo, hi, N)
        for rule in ("single", "majority", "worst"):
            bonus = 2 if rule == "single" and k_rob + 2 <= N else 0  # single draw is more optimistic
            metrics[f"clean_accuracy_{rule}"] = metrics["clean_accuracy"]
            metrics[f"robust_accuracy_{rule}"] = ((k_rob + bonus) / N, *wilson_interval(k_rob + bonus, N), N)
        nfe_per = 0 if defense == "none" else 10
        st.finish_job(
            jid, metrics=metrics, curves={"pgd": [(c / N, N) for c in curve]},
            timings={"total_s": 2.0, "per_example_s": 0.1}, environment={"python": "3.x", "device": "cpu"},
            nfe={"attack_purifications": 100 * eot, "eval_purifications": N * draws, "classifier_images": 500,
                 "nfe_per_purification": nfe_per, "purifier_nfe_images": nfe_per * (100 * eot + N * draws)},
        )
    st.record_skip(_job_id("toy-quantize", "adaptive", "digits"), "no full gradient path in this test",
                   defense="toy-quantize", threat="adaptive", dataset="digits", classifier="digits-cnn", seed=0,
                   n_examples=N, identity={}, config={}, adaptive=True)
    st.engine.dispose()
    return st


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dash") / "results.db"
    fill_store(p)
    return p


@pytest.fixture(scope="module")
def engine(store_path):
    e = Q.make_engine(str(store_path))
    yield e
    e.dispose()


# --------------------------------------------------------------------------- queries
def test_load_jobs_reads_every_job_with_metrics(engine):
    jobs = Q.load_jobs(engine)
    assert len(jobs) == len(ROBUST) + 1
    assert set(jobs["status"]) == {"done", "skipped"}
    r = jobs.set_index("job_id").loc[_job_id("toy-noise", "adaptive", "digits")]
    assert r["robust"] == pytest.approx(0.35) and r["robust_n"] == N and r["clean"] == pytest.approx(0.9)
    assert r["robust_lo"] < 0.35 < r["robust_hi"] and r["gradient_path"] == "full" and r["eot_samples"] == 4
    assert r["nfe_per_example"] == pytest.approx(10 * (400 + 200) / N) and r["per_example_s"] == pytest.approx(0.1)
    single = Q.load_jobs(engine, rule="single").set_index("job_id")
    assert single.loc[_job_id("toy-noise", "adaptive", "digits"), "robust"] == pytest.approx(0.45)
    with pytest.raises(ValueError):
        Q.load_jobs(engine, rule="best")


def test_leaderboard_rows_worst_case_and_marks(engine):
    jobs = Q.load_jobs(engine)
    lb = Q.leaderboard(jobs)
    assert len(lb) == 5  # (defense, classifier, dataset) rows
    assert Q.lb_threats(lb) == ["preprocessor-blind", "bpda", "adaptive"]
    assert lb["worst"].is_monotonic_decreasing
    row = lb[(lb["defense"] == "toy-noise") & (lb["dataset"] == "digits")].iloc[0]
    assert row["worst"] == pytest.approx(0.35) and row["worst:threat"] == "adaptive" and row["worst:path"] == "full"
    assert row["worst:eot"] == 4 and row["worst:n"] == N and row["worst:lo"] < row["worst"] < row["worst:hi"]
    assert row["robust:bpda"] == pytest.approx(0.55) and row["robust:bpda:path"] == "bpda"
    assert row["clean"] == pytest.approx(0.9) and not row["non_adaptive_only"]
    assert row["threats_run"] == "preprocessor-blind, bpda, adaptive"
    q = lb[lb["defense"] == "toy-quantize"].iloc[0]
    assert q["non_adaptive_only"] and q["worst"] == pytest.approx(0.70) and q["worst:threat"] == "bpda"
    assert pd.isna(q["robust:adaptive"]) and q["robust:adaptive:note"].startswith("skipped: no full gradient")
    assert lb.iloc[0]["defense"] == "toy-quantize"  # highest worst case first (flagged as non-adaptive only)


def test_filters_change_the_leaderboard(engine):
    jobs = Q.load_jobs(engine)
    opts = Q.filter_options(jobs)
    assert opts["dataset"] == ["digits", "mnist5k"] and opts["threat"] == ["preprocessor-blind", "bpda", "adaptive"]
    assert opts["eps"] == [0.2] and opts["norm"] == ["linf"]
    lb = Q.leaderboard(Q.apply_filters(jobs, dataset=["mnist5k"]))
    assert sorted(lb["defense"]) == ["none", "toy-noise"] and set(lb["dataset"]) == {"mnist5k"}
    blind = Q.leaderboard(Q.apply_filters(jobs, threat=["preprocessor-blind"], dataset=["digits"]))
    assert Q.lb_threats(blind) == ["preprocessor-blind"] and blind["non_adaptive_only"].all()
    assert blind.set_index("defense").loc["toy-noise", "worst"] == pytest.approx(0.80)
    assert len(Q.apply_filters(jobs, eps=[0.2 + 1e-15])) == jobs["eps"].notna().sum() == len(ROBUST)
    assert Q.apply_filters(jobs, eps=[0.1]).empty
    with pytest.raises(ValueError):
        Q.apply_filters(jobs, seed=[0])
    assert Q.leaderboard(Q.apply_filters(jobs, dataset=["nothing"])).empty


def test_display_table_names_interval_path_and_eot(engine):
    lb = Q.leaderboard(Q.load_jobs(engine))
    t = Q.display_table(lb).set_index(["Defense", "Dataset"])
    cell = t.loc[("toy-noise", "digits"), "Robust: adaptive"]
    assert cell.startswith("35.0 [") and "n=20" in cell and "full, EOT 4, R 10" in cell and "†" not in cell
    assert "bpda, EOT 4" in t.loc[("toy-noise", "digits"), "Robust: bpda"] and "†" in t.loc[("toy-noise", "digits"), "Robust: bpda"]
    assert t.loc[("toy-quantize", "digits"), "Worst case (95% CI, n, threat, path)"].startswith("⚠ 70.0")
    assert t.loc[("toy-quantize", "digits"), "Evaluated by"].startswith("⚠ non-adaptive only")
    assert t.loc[("toy-quantize", "digits"), "Robust: adaptive"].startswith("skipped:")
    assert t.loc[("none", "mnist5k"), "Robust: bpda"] == "–"


def test_exports_csv_and_latex(engine):
    lb = Q.leaderboard(Q.load_jobs(engine))
    import io

    back = pd.read_csv(io.StringIO(Q.to_csv(lb)))
    assert len(back) == len(lb) and {"defense", "worst", "worst:lo", "robust:adaptive:eot", "non_adaptive_only"} <= set(back.columns)
    assert back.loc[back["defense"] == "none", "worst"].min() == 0.0
    tex = Q.to_latex(lb)
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and "toy-noise" in tex and r"$^\dagger$" in tex
    assert tex.count(r" \\") == len(lb) + 1  # header + one line per row
    assert Q.tex_escape("a_b&c%") == r"a\_b\&c\%"


def test_chart_data(engine):
    jobs = Q.load_jobs(engine)
    lb = Q.leaderboard(jobs)
    sd = Q.scatter_data(lb)
    assert len(sd) == 5 and (sd["worst_lo"] <= sd["worst"]).all() and (sd["clean_hi"] >= sd["clean"]).all()
    pl = Q.per_threat_long(lb)
    assert len(pl) == len(ROBUST) and set(pl["threat"]) == set(THREATS)
    cost = Q.cost_table(jobs).set_index(["defense", "threat"])
    assert cost.loc[("none", "adaptive"), "nfe_per_example"] == 0
    assert cost.loc[("toy-noise", "adaptive"), "seconds_per_example"] == pytest.approx(0.1)


def test_job_drilldown_queries(engine):
    jid = _job_id("toy-noise", "adaptive", "digits")
    d = Q.job_detail(engine, jid)
    assert d["id"] == jid and d["config"]["threat"] == "adaptive" and d["environment"]["device"] == "cpu"
    assert d["timings"]["per_example_s"] == 0.1
    assert Q.job_detail(engine, "nope") is None
    m = Q.job_metrics(engine, jid).set_index("name")
    assert m.loc["robust_accuracy", "value"] == pytest.approx(0.35) and m.loc["robust_accuracy", "n"] == N
    c = Q.job_curves(engine, jid)
    assert list(c["iteration"]) == list(range(6)) and c["accuracy"].iloc[0] == 1.0 and c["accuracy"].iloc[-1] == pytest.approx(0.35)
    ex = Q.job_examples(engine, jid)
    assert len(ex) == N and ex["robust_worst"].sum() == 7 and isinstance(ex["adv_preds"].iloc[0], dict)
    assert Q.examples_for_display(ex)["adv_preds"].iloc[0].startswith("pgd: ")
    samples = Q.job_samples(engine, jid)
    assert [p for p, _ in samples] == [0, 1, 2, 3]
    img = samples[0][1]["clean"]
    assert img.shape == (1, 8, 8) and img.dtype == np.uint8
    big = Q.to_display_image(img)
    assert big.shape == (112, 112) and big[0, 0] == img[0, 0, 0]
    rgb = Q.to_display_image(np.zeros((3, 32, 32), np.uint8))
    assert rgb.shape == (96, 96, 3)
    pert, linf = Q.perturbation_image(samples[0][1]["clean"], samples[0][1]["adversarial"])
    assert pert.shape == (112, 112) and 0 < linf <= 51 / 255 + 1e-9


def _robust_job(st: Store, jid: str, threat: str, robust: set[int], eps: float = 0.2, n: int = N) -> None:
    st.begin_job(jid, defense="d", threat=threat, dataset="digits", classifier="c", seed=0, n_examples=n, norm="linf", eps=eps,
                 gradient_path="full", adaptive=True, identity={}, config={"threat_spec": {"scoring": "worst"}})
    ex = [dict(position=i, dataset_index=100 + i, label=0, clean_preds=[0], adv_preds={"pgd": [0 if i in robust else 1]},
               worst_attack=None, linf=0.0, l2=0.0, clean_single=True, clean_majority=True, clean_worst=True,
               robust_single=i in robust, robust_majority=i in robust, robust_worst=i in robust, detect_clean=None, detect_adv=None)
          for i in range(n)]
    st.write_batch(jid, 0, examples=ex, curves={}, nfe={}, seconds=0.0)
    k = len(robust)
    st.finish_job(jid, metrics={"robust_accuracy": (k / n, *wilson_interval(k, n), n), "clean_accuracy": (1.0, *wilson_interval(n, n), n)},
                  curves={}, timings={}, nfe={}, environment={})


def test_per_example_worst_case_is_below_the_minimum_of_threats(tmp_path):
    st = Store(str(tmp_path / "w.db"))
    _robust_job(st, "a" * 64, "bpda", set(range(0, 10)))        # 50%
    _robust_job(st, "b" * 64, "adaptive", set(range(5, 15)))    # 50%, different examples
    _robust_job(st, "c" * 64, "adaptive", set(range(0, 20)), eps=0.1)  # another budget: not mixed in
    e = Q.make_engine(str(tmp_path / "w.db"))
    try:
        jobs = Q.load_jobs(e)
        assert Q.leaderboard(jobs).iloc[0]["worst"] == pytest.approx(0.5)  # at eps 0.2; the minimum over threats
        pw = Q.per_example_worst(e, jobs)
        assert len(pw) == 1, "only the eps=0.2 group has two jobs"
        r = pw.iloc[0]
        assert r["eps"] == pytest.approx(0.2) and r["n"] == N and r["jobs"] == 2 and r["threats"] == "bpda, adaptive"
        assert r["robust"] == pytest.approx(5 / N) and r["min_of_threats"] == pytest.approx(0.5)
        assert r["robust_lo"] <= r["robust"] <= r["robust_hi"]
    finally:
        e.dispose()


def test_store_is_opened_read_only(store_path, engine):
    def state():
        wal = store_path.with_name(store_path.name + "-wal")
        return store_path.stat().st_mtime_ns, store_path.stat().st_size, wal.stat().st_size if wal.exists() else 0

    before, sig = state(), Q.store_signature(str(store_path))
    Q.leaderboard(Q.load_jobs(engine))
    Q.job_samples(engine, _job_id("none", "bpda", "digits"))
    assert "mode=ro" in Q.readonly_url(str(store_path)) and Q.readonly_url(f"sqlite:///{store_path}") == Q.readonly_url(str(store_path))
    with pytest.raises(OperationalError, match="readonly|read-only|query_only"):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs"))
    assert state() == before and Q.store_signature(str(store_path)) == sig  # nothing written, cache key stable
    assert len(Q.load_jobs(engine)) == len(ROBUST) + 1
    assert Q.readonly_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_signature_changes_when_the_store_changes(tmp_path):
    p = tmp_path / "s.db"
    assert Q.store_missing(str(p))
    st = Store(str(p))
    s1 = Q.store_signature(str(p))
    st.record_skip("x", "r", defense="d", threat="t", dataset="digits", classifier="c", seed=0, n_examples=1, identity={}, config={})
    assert Q.store_signature(str(p)) != s1 and not Q.store_missing(str(p))
    e = Q.make_engine(str(p))
    assert Q.load_jobs(e)["status"].tolist() == ["skipped"]
    e.dispose()


def test_empty_store(tmp_path):
    p = tmp_path / "empty.db"
    Store(str(p)).engine.dispose()
    e = Q.make_engine(str(p))
    jobs = Q.load_jobs(e)
    assert jobs.empty and list(jobs.columns) == Q.JOB_COLUMNS
    assert Q.leaderboard(jobs).empty and Q.display_table(Q.leaderboard(jobs)).empty
    e.dispose()
    bare = tmp_path / "bare.db"
    import sqlite3

    sqlite3.connect(bare).close()  # an empty file that is not a store
    e = Q.make_engine(str(bare))
    assert Q.load_jobs(e).empty
    e.dispose()


# --------------------------------------------------------------------------- the page (AppTest)
def _apptest(db: str, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HARNESS_DASHBOARD_DB", db)
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    at = AppTest.from_file(APP, default_timeout=60)
    return at.run()


def _table(at) -> pd.DataFrame:
    for df in at.dataframe:
        if "Defense" in df.value.columns:
            return df.value
    raise AssertionError("no leaderboard table on the page")


def test_page_renders_and_filters(store_path, monkeypatch):
    at = _apptest(str(store_path), monkeypatch)
    assert not at.exception, at.exception
    t = _table(at)
    assert {"none", "toy-noise", "toy-quantize"} <= set(t["Defense"]) and len(t) == 5
    assert "Robust: adaptive" in t.columns and t["Worst-case robust %"].iloc[0] == pytest.approx(70.0)
    assert any("⚠" in c for c in t["Evaluated by"])
    at.sidebar.multiselect(key="f_dataset").select("mnist5k").run()
    assert not at.exception, at.exception
    t2 = _table(at)
    assert len(t2) == 2 and set(t2["Dataset"]) == {"mnist5k"}
    at.sidebar.multiselect(key="f_dataset").unselect("mnist5k").run()
    at.sidebar.multiselect(key="f_threat").select("preprocessor-blind").run()
    t3 = _table(at)
    assert "Robust: adaptive" not in t3.columns and all(c.startswith("⚠") for c in t3["Worst case (95% CI, n, threat, path)"])
    at.sidebar.radio(key="rule").set_value("single").run()
    assert not at.exception, at.exception


def test_page_drilldown(store_path, monkeypatch):
    at = _apptest(str(store_path), monkeypatch)
    rows = at.selectbox(key="row_pick")
    k = next(i for i, o in enumerate(rows.options) if o.startswith("toy-noise") and "digits" in o)
    rows.select_index(k).run()
    assert not at.exception, at.exception
    job = at.selectbox(key="job_pick")
    assert job.value == _job_id("toy-noise", "adaptive", "digits")  # the row's worst-case job by default
    text_out = " ".join(m.value for m in at.markdown)
    assert "toy-noise" in text_out and "adaptive" in text_out
    assert "Per-example worst case over the threats run" in text_out
    assert any(c.value == job.value for c in at.code)  # the identity hash
    job.set_value(_job_id("toy-noise", "bpda", "digits")).run()
    assert not at.exception, at.exception


def test_page_empty_store_explains_how_to_fill_it(tmp_path, monkeypatch):
    at = _apptest(str(tmp_path / "missing.db"), monkeypatch)
    assert not at.exception
    assert any("harness run --defense none --threat preprocessor-blind" in i.value for i in at.info)
    assert not (tmp_path / "missing.db").exists()  # read-only: never created
    Store(str(tmp_path / "empty.db")).engine.dispose()
    at = _apptest(str(tmp_path / "empty.db"), monkeypatch)
    assert not at.exception and any("harness run" in i.value for i in at.info)


# --------------------------------------------------------------------------- `harness dashboard`
def test_dashboard_subcommand(monkeypatch, tmp_path):
    import argparse

    from dashboard import cli as D

    parser = argparse.ArgumentParser(prog="harness")
    D.add_dashboard_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dashboard", "--db", str(tmp_path / "r.db"), "--port", "9001", "--no-headless"])
    assert args.port == 9001 and args.headless is False and args.func is D.cmd_dashboard
    assert parser.parse_args(["dashboard", "--headless"]).headless is True
    assert parser.parse_args(["dashboard"]).headless is None and parser.parse_args(["dashboard"]).port == 8501

    seen = {}

    class FakePopen:
        def __init__(self, cmd, env):
            seen.update(cmd=cmd, env=env)

        def wait(self):
            return 0

    monkeypatch.setattr(D.subprocess, "Popen", FakePopen)
    monkeypatch.chdir(tmp_path)
    assert D.main(["dashboard", "--db", "rel.db", "--port", "9002", "--headless"]) == 0
    cmd, env = seen["cmd"], seen["env"]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == APP
    assert cmd[cmd.index("--server.port") + 1] == "9002" and cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[-3:] == ["--", "--db", str(tmp_path / "rel.db")] and env["HARNESS_DASHBOARD_DB"] == str(tmp_path / "rel.db")
    assert not (tmp_path / "rel.db").exists()  # never created
    assert D.main(["dashboard", "--db", "sqlite:///x.db", "--address", "127.0.0.1"]) == 0
    assert seen["cmd"][-1] == "sqlite:///x.db" and seen["cmd"][seen["cmd"].index("--server.address") + 1] == "127.0.0.1"
    assert D.main(["dashboard", "--port", "70000"]) == 2


# --------------------------------------------------------------------------- the real server in Chromium
# dashboard/browser.py: the WebDriver client, the server start and the page wait, shared with the README's screenshot
from dashboard.browser import WebDriver, serve_dashboard, stop as _stop, wait_for_page  # noqa: E402


def test_browser_end_to_end(store_path, tmp_path):
    from dashboard.browser import free_port, missing_browser

    if missing_browser():
        pytest.fail(f"{missing_browser()} before the tests")
    port = free_port()
    server = serve_dashboard(store_path, port, tmp_path / "server.log")
    driver = None
    try:
        driver = WebDriver(tmp_path / "profile", tmp_path / "chromedriver.log")
        driver.get(f"http://127.0.0.1:{port}/")
        dom = wait_for_page(driver, ["Adversarial purification leaderboard", "toy-noise", "Job drill-down"], timeout=60)
        assert "Adversarial purification leaderboard" in dom, dom[-3000:]
        assert "toy-noise" in dom, "a defense name from the store is not in the rendered page"
        shot = tmp_path / "dashboard.png"
        driver.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    finally:
        if driver is not None:
            driver.close()
        _stop(server)
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
