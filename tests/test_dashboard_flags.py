"""The leaderboard marks flagged cells and compares two jobs in the drill-down (issue 15), on small real runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dashboard import queries as Q
from harness import evaluation as E
from harness.evaluation.stats import mcnemar_exact
from harness.store import Store

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
N = 16


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    db = tmp_path_factory.mktemp("dashflags") / "r.db"
    store = Store(str(db))
    ids = {}
    for key, defense, threat, over in (
        ("short", "none", "adaptive", (("attacks", "pgd"), ("steps", "3"), ("also_paths", ""))),
        ("blind", "none", "preprocessor-blind", (("steps", "20"),)),
        ("maep", "maep", "preprocessor-blind", (("steps", "3"),)),
    ):
        cfg = E.RunConfig(defense=defense, threat=threat, dataset="digits", n_examples=N, overrides=over)
        ids[key] = E.run_job(E.resolve(cfg), store, progress=False)
    store.engine.dispose()
    return db, ids


def test_queries_carry_the_flags_and_compare_two_jobs(store_path):
    db, ids = store_path
    e = Q.make_engine(str(db))
    jobs = Q.load_jobs(e).set_index("job_id")
    assert "not_converged" in jobs.loc[ids["short"].job_id, "flags"]
    assert "non_adaptive_only" in jobs.loc[ids["maep"].job_id, "flags"]
    table = Q.display_table(Q.leaderboard(Q.load_jobs(e)))
    none = table[table["Defense"] == "none"].iloc[0]
    assert "🚩 not_converged" in none["Robust: adaptive"]
    assert "non_adaptive_only" not in " ".join(table[table["Defense"] == "maep"].iloc[0].astype(str))  # that is the † mark
    assert Q.flag_mark("non_adaptive_only") == "" and Q.flag_mark("?") == "" and Q.flag_mark(None) == ""
    assert Q.flag_mark("not_converged,non_adaptive_only,zero_gradients") == " 🚩 not_converged,zero_gradients"
    c = Q.compare_jobs(e, ids["blind"].job_id, ids["maep"].job_id)
    assert c["n_shared"] == N
    t = c["robust"]["table"]
    assert c["robust"]["p_value"] == pytest.approx(mcnemar_exact(t["first_only"], t["second_only"]))
    assert c["robust"]["accuracy_second"] == pytest.approx(ids["maep"].metrics["robust_accuracy"]["value"])
    e.dispose()


def test_page_shows_flags_and_a_paired_comparison(store_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    db, ids = store_path
    monkeypatch.setenv("HARNESS_DASHBOARD_DB", str(db))
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    board = next(df.value for df in at.dataframe if "Defense" in df.value.columns)
    assert any("🚩 not_converged" in str(v) for v in board.to_numpy().ravel())
    rows = at.selectbox(key="row_pick")
    rows.select_index(next(i for i, o in enumerate(rows.options) if o.startswith("none"))).run()
    at.selectbox(key="job_pick").set_value(ids["short"].job_id).run()
    assert not at.exception, at.exception
    assert any("not_converged" in w.value for w in at.warning)
    at.selectbox(key="compare_pick").set_value(ids["maep"].job_id).run()
    assert not at.exception, at.exception
    cmp = next(df.value for df in at.dataframe if "McNemar p (exact)" in df.value.columns)
    assert list(cmp[""]) == ["robust", "clean"]
    assert int(cmp[["both right", "A only", "B only", "neither"]].iloc[0].sum()) == N
