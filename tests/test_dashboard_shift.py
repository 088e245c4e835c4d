"""The leaderboard's shift view and cross-dataset matrix, on a store of real (small) engine runs:
shifted and transferred cells are shown beside the worst case, never inside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dashboard import queries as Q
from harness import evaluation as E
from harness.core.env import WEIGHTS_DIR
from harness.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("beside")
    wdir = tmp / "weights"
    wdir.mkdir()
    for ext in (".pt", ".json"):  # the digits MAEP filed as an mnist5k one: a stand-in transfer source
        shutil.copy(WEIGHTS_DIR / f"maep-digits{ext}", wdir / f"maep-mnist5k{ext}")
    db = tmp / "r.db"
    store = Store(str(db))

    def run(defense, threat, *over, **kw):
        cfg = E.RunConfig(defense=defense, threat=threat, dataset="digits", n_examples=32, weights_dir=str(wdir),
                          overrides=tuple(over), **kw)
        return E.run_job(E.resolve(cfg), store, progress=False)

    run("none", "preprocessor-blind")
    run("none", "color-shift", ("shift", "brightness"), ("severity", "5"), ("eps", "0.3"))  # lower than any attack cell
    run("maep", "preprocessor-blind")
    run("maep", "cross-dataset", ("attacks", "pgd"))
    run("maep", "cross-dataset", ("attacks", "pgd"), ("trained_on", "mnist5k"))
    store.engine.dispose()
    return db


@pytest.fixture(scope="module")
def jobs(store_path):
    e = Q.make_engine(str(store_path))
    yield e, Q.load_jobs(e)
    e.dispose()


def test_shifted_and_transferred_jobs_stay_out_of_the_worst_case(jobs):
    _, j = jobs
    beside = dict(zip(j["threat"] + "/" + j["trained_on"].fillna("-"), j["beside"]))
    assert beside == {"preprocessor-blind/-": False, "color-shift/-": True, "preprocessor-blind/digits": False,
                      "cross-dataset/digits": True, "cross-dataset/mnist5k": True}
    lb = Q.leaderboard(j).set_index("defense")
    pb = j[(j["threat"] == "preprocessor-blind")].set_index("defense")["robust"]
    cs = j[(j["threat"] == "color-shift")]["robust"].iloc[0]
    assert cs < pb["none"]  # so including the shift would have moved the headline
    for d in ("none", "maep"):
        assert lb.loc[d, "worst"] == pb[d] and lb.loc[d, "worst:threat"] == "preprocessor-blind"
    assert not any(c.startswith("robust:color-shift") or c.startswith("robust:cross-dataset") for c in lb.columns)


def test_shift_view_reports_the_paired_changes(jobs):
    e, j = jobs
    sv = Q.shift_view(e, j)
    assert len(sv) == 1
    r = sv.iloc[0]
    assert r["defense"] == "none" and r["shift"] == "brightness:severity=5"
    assert r["clean_accuracy_change:lo"] <= r["clean_accuracy_change"] <= r["clean_accuracy_change:hi"]
    assert r["clean_accuracy_change"] == pytest.approx(r["clean"] - r["clean_accuracy_unshifted"])
    assert r["robust_accuracy_classifier_change"] == pytest.approx(r["robust_accuracy_change"])  # 'none' is the classifier


def test_transfer_matrix_has_the_diagonal_and_the_transfer_cell(jobs):
    e, j = jobs
    tm = Q.transfer_matrix(e, j).set_index("trained_on")
    assert set(tm.index) == {"digits", "mnist5k"} and set(tm["dataset"]) == {"digits"}
    assert tm.loc["digits", "robust_accuracy_change"] == 0  # the in-distribution cell is its own reference
    change = tm.loc["mnist5k", "robust_accuracy_change"]
    assert change == pytest.approx(tm.loc["mnist5k", "robust"] - tm.loc["digits", "robust"])  # same examples, same attack
    pv = Q.transfer_pivot(Q.transfer_matrix(e, j))
    assert list(pv.columns) == ["defense", "trained on", "digits"] and len(pv) == 2
    assert "[" in pv.set_index("trained on").loc["mnist5k", "digits"]


def test_page_shows_both_views(store_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HARNESS_DASHBOARD_DB", str(store_path))
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("colour shift and cross-dataset" in h.value for h in at.subheader)
    tables = [df.value for df in at.dataframe]
    assert any("Δ robust (pts)" in t.columns for t in tables)
    assert any(list(t.columns) == ["defense", "trained on", "digits"] for t in tables)
