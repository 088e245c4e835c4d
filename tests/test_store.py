"""The results store: round trips, Wilson intervals, schema, batch idempotence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.core.registry import HarnessError
from harness.evaluation.stats import wilson_interval
from harness.store import Store, resolve_url
from harness.store.codec import decode_images, encode_images


def _example(pos: int, ok: bool = True) -> dict:
    return dict(
        position=pos, dataset_index=100 + pos, label=pos % 10, clean_preds=[pos % 10] * 3,
        adv_preds={"pgd": [pos % 10, 1, 2]}, worst_attack=None if ok else "pgd", linf=0.03, l2=0.5,
        clean_single=True, clean_majority=True, clean_worst=True, robust_single=ok, robust_majority=ok, robust_worst=ok,
        detect_clean=None, detect_adv=None,
    )


def _fields(**kw):
    base = dict(defense="none", threat="bpda", dataset="digits", classifier="digits-cnn", seed=0, n_examples=4,
                identity={"a": 1}, config={"b": 2})
    base.update(kw)
    return base


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.2775, abs_tol=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0


def test_round_trip(tmp_path):
    st = Store(str(tmp_path / "r.db"))
    st.begin_job("j1", **_fields())
    img = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    st.write_batch("j1", 0, examples=[_example(0), _example(1, ok=False)], curves={"pgd": [2, 1]}, nfe={"x": 3}, seconds=0.5,
                   samples=[{"position": 0, "images": {"clean": img, "adversarial": img, "purified": img}}])
    st.write_batch("j1", 0, examples=[_example(0)], curves={}, nfe={}, seconds=0.1)  # duplicate batch: ignored
    assert st.done_batches("j1") == {0}
    st.finish_job("j1", metrics={"robust_accuracy": (0.5, 0.1, 0.9, 2)}, curves={"pgd": [(1.0, 2), (0.5, 2)]},
                  timings={"total_s": 1.0}, nfe={"x": 3}, environment={"device": "cpu"})
    st2 = Store(str(tmp_path / "r.db"))
    job = st2.get_job("j1")
    assert job.status == "done" and job.identity == {"a": 1} and job.environment == {"device": "cpu"}
    rows = st2.example_rows("j1")
    assert [r.position for r in rows] == [0, 1] and rows[1].adv_preds == {"pgd": [1, 1, 2]} and rows[1].worst_attack == "pgd"
    m = st2.metrics("j1")["robust_accuracy"]
    assert (m.value, m.lower, m.upper, m.n) == (0.5, 0.1, 0.9, 2)
    assert st2.curves("j1") == {"pgd": [1.0, 0.5]}
    (pos, imgs), = st2.samples("j1")
    assert pos == 0 and np.array_equal(imgs["clean"], img)
    table = st2.results_table()
    assert table[0]["robust"] == 0.5 and table[0]["defense"] == "none"


def test_start_and_complete_job_are_one_transaction_each(tmp_path):
    st = Store(str(tmp_path / "r.db"))
    assert st.start_job("j", **_fields()) == set() and st.job_status("j") == "running"
    st.write_batch("j", 0, examples=[_example(0)], curves={}, nfe={}, seconds=0.1)
    assert st.start_job("j", **_fields()) == {0}  # resuming: the stored batches to skip
    last = dict(batch=1, examples=[_example(1, ok=False)], curves={"pgd": [1, 0]}, nfe={"x": 1}, seconds=0.2)

    def broken(examples, batches):
        assert [e.position for e in examples] == [0, 1] and [b.batch for b in batches] == [0, 1]  # the held batch is read
        raise HarnessError("aggregation failed")

    with pytest.raises(HarnessError, match="aggregation failed"):
        st.complete_job("j", last, broken)
    assert st.done_batches("j") == {0} and st.job_status("j") == "running"  # nothing of it was written

    def aggregate(examples, batches):
        k = sum(e.robust_worst for e in examples)
        return dict(metrics={"robust_accuracy": (k / max(len(examples), 1), None, None, len(examples))}, curves={}, nfe={},
                    timings={"total_s": sum(b.seconds for b in batches)}, environment={"device": "cpu"}, fields={"flags": []})

    st.complete_job("j", last, aggregate)
    job = Store(str(tmp_path / "r.db"), read_only=True).get_job("j")
    assert job.status == "done" and job.flags == [] and job.timings == {"total_s": pytest.approx(0.3)}
    assert job.identity == {"a": 1}  # written when it began, kept
    assert st.done_batches("j") == {0, 1} and st.metrics("j")["robust_accuracy"].value == 0.5
    with pytest.raises(HarnessError, match="vanished"):
        st.complete_job("gone", None, aggregate)


def test_replace_job_is_atomic_and_complete(tmp_path):
    st = Store(str(tmp_path / "r.db"))
    st.begin_job("j", **_fields())
    st.write_batch("j", 0, examples=[_example(0)], curves={}, nfe={}, seconds=0.1)
    st.finish_job("j", metrics={"m": (1.0, None, None, 1)}, curves={}, timings={}, nfe={}, environment={})
    st.replace_job("j", [dict(batch=0, examples=[_example(0, ok=False), _example(1)], curves={}, nfe={}, seconds=0.2)],
                   metrics={"m": (0.5, None, None, 2)}, curves={}, timings={}, nfe={}, environment={})
    assert len(st.example_rows("j")) == 2 and st.metrics("j")["m"].value == 0.5


def test_fail_and_skip_are_recorded(tmp_path):
    st = Store(str(tmp_path / "r.db"))
    st.begin_job("a", **_fields())
    st.fail_job("a", "boom")
    st.record_skip("b", "no full gradient path", **_fields())
    assert st.get_job("a").status == "failed" and st.get_job("a").reason == "boom"
    assert st.get_job("b").status == "skipped"
    assert {r["status"] for r in st.results_table(status=None)} == {"failed", "skipped"}


def test_url_resolution(monkeypatch):
    monkeypatch.delenv("HARNESS_DB", raising=False)
    assert resolve_url(None) == "sqlite:///results.db"
    monkeypatch.setenv("HARNESS_DB", "other.db")
    assert resolve_url(None) == "sqlite:///other.db"
    assert resolve_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        Store(str(tmp_path / "nope" / "r.db"))


def test_image_codec_round_trip():
    a = np.random.RandomState(0).randint(0, 255, (3, 4, 4)).astype(np.uint8)
    assert np.array_equal(decode_images(encode_images(a=a))["a"], a)


def test_an_adv_cache_entry_stored_first_is_kept_and_writing_it_again_is_no_error(tmp_path):
    """Two processes that computed the same preprocessor-blind batch both write it: the second write
    keeps the first entry (insert-or-ignore) and still stores its own job's batch.
    """
    db = str(tmp_path / "r.db")
    first, second = Store(db), Store(db)  # two handles on one file, as two processes hold

    def entry(v: float) -> dict:
        return {"pgd": {"x_adv": np.full((1, 1, 2, 2), v, np.float32), "margin": np.array([v], np.float32), "curve": [1, 0]}}

    for st, job in ((first, "a"), (second, "b")):
        st.begin_job(job, **_fields())
    first.write_batch("a", 0, examples=[_example(0)], curves={}, nfe={}, seconds=0.1, adv_cache=("k", entry(0.25)))
    second.write_batch("b", 0, examples=[_example(0)], curves={}, nfe={}, seconds=0.1, adv_cache=("k", entry(0.5)))
    assert second.done_batches("b") == {0} and float(second.get_adv("k")["pgd"]["margin"][0]) == 0.25


def test_a_read_only_store_never_creates_a_file(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(HarnessError, match="does not exist"):
        Store(str(missing), read_only=True)
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    Store(str(missing)).close()  # a writer creates it, with its schema
    with pytest.raises(HarnessError, match="was opened read-only"):
        Store(str(missing), read_only=True).begin_job("j", **_fields())
