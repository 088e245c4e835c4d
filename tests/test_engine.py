"""The engine end to end on the embedded digits dataset with the shipped CNN."""

from __future__ import annotations

import pytest
import torch

from harness import evaluation as E
from harness.core.registry import HarnessError
from harness.store import Store
from tests.conftest import TOY_PLUGIN

N = 64


def cfg(**kw) -> E.RunConfig:
    base = dict(dataset="digits", n_examples=N, plugins=(TOY_PLUGIN,))
    base.update(kw)
    if "overrides" in base:
        base["overrides"] = tuple(base["overrides"])
    return E.RunConfig(**base)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "results.db"))


def test_undefended_digits_cnn_collapses_under_pgd(store):
    out = E.run_job(E.resolve(cfg(n_examples=None)), store, progress=False)
    j = out.as_json()
    assert j["n_examples"] == 256 and j["classifier"] == "digits-cnn"
    assert j["clean_accuracy"] >= 0.95
    assert j["robust_accuracy"] < 0.10
    assert j["gradient_path"] == "classifier" and j["eval_draws"] == 1 and j["eot_samples"] == 1
    curve = out.curves["pgd"]
    assert len(curve) == 21 and curve[0] >= curve[-1]
    # the adversarial examples respect the budget
    rows = store.example_rows(out.job_id)
    assert max(r.linf for r in rows) <= 0.2 + 1e-6


def test_pgd_at_8_over_255_on_digits(store):
    """The issue's check at the CIFAR budget: 8/255 on 8x8 digits (16 grey levels)."""
    out = E.run_job(E.resolve(cfg(n_examples=None, overrides=[("eps", "8/255")])), store, progress=False)
    rows = store.example_rows(out.job_id)
    assert max(r.linf for r in rows) <= 8 / 255 + 1e-6
    assert min(min(r.clean_preds) >= 0 for r in rows)
    assert out.metrics["robust_accuracy"]["value"] < out.metrics["clean_accuracy"]["value"]


def test_rerun_reuses_and_force_recomputes_identically(store):
    c = cfg(defense="toy-noise", threat="bpda", n_examples=24, overrides=[("batch_size", "8"), ("steps", "3")])
    first = E.run_job(E.resolve(c), store, progress=False)
    again = E.run_job(E.resolve(c), store, progress=False)
    assert again.reused and again.metrics == first.metrics
    forced = E.run_job(E.resolve(c), store, force=True, progress=False)
    assert not forced.reused and forced.metrics == first.metrics
    assert len(store.example_rows(first.job_id)) == 24


def test_interrupted_job_resumes_to_the_same_result(tmp_path, monkeypatch):
    c = cfg(defense="toy-noise", threat="preprocessor-blind", n_examples=30, overrides=[("batch_size", "8")])
    ref_store = Store(str(tmp_path / "ref.db"))
    ref = E.run_job(E.resolve(c), ref_store, progress=False)

    st = Store(str(tmp_path / "r.db"))
    from harness.evaluation import lifecycle as L

    real = L.run_batch
    calls = {"n": 0}

    def flaky(job, b, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job, b, *a, **k)

    monkeypatch.setattr(L, "run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        E.run_job(E.resolve(c), st, progress=False)
    assert st.done_batches(ref.job_id) == {0, 1}
    monkeypatch.setattr(L, "run_batch", real)
    resumed = E.run_job(E.resolve(c), st, progress=False)
    assert resumed.metrics == ref.metrics
    assert resumed.timings["resumed_batches"] == 2
    a = [(r.position, r.clean_preds, r.adv_preds) for r in st.example_rows(ref.job_id)]
    b = [(r.position, r.clean_preds, r.adv_preds) for r in ref_store.example_rows(ref.job_id)]
    assert a == b


def test_identity_hash_tracks_everything_that_changes_the_number():
    base = E.resolve(cfg(defense="toy-smooth", n_examples=16)).job_id
    assert E.resolve(cfg(defense="toy-smooth", n_examples=16)).job_id == base
    for change in (
        dict(seed=1), dict(data_seed=1), dict(n_examples=17), dict(overrides=[("eps", "0.05")]),
        dict(overrides=[("sharpness", "2")]), dict(threat="bpda"), dict(defense="none"),
    ):
        assert E.resolve(cfg(**{**dict(defense="toy-smooth", n_examples=16), **change})).job_id != base, change


@pytest.mark.parametrize("threat", ["preprocessor-blind", "adaptive"])
def test_spellings_of_the_default_budget_are_one_job(threat):
    """eps=0.2 (the digits default, spelled out), eps=1/5 and no --set give one job id, as do
    spellings of a defense's float option.
    """
    ids = {
        E.resolve(cfg(threat=threat, n_examples=8, overrides=o)).job_id
        for o in ([], [("eps", "0.2")], [("eps", "1/5")], [("threat.eps", "2/10")], [("eps", "0.2"), ("step_size", "1/20")])
    }
    assert len(ids) == 1
    noise = {E.resolve(cfg(defense="toy-noise", threat="bpda", n_examples=8, overrides=o)).job_id
             for o in ([], [("sigma", "0.25")], [("sigma", "1/4")])}
    assert len(noise) == 1
    assert E.resolve(cfg(threat=threat, n_examples=8, overrides=[("eps", "0.19")])).job_id not in ids


def test_stochastic_defense_scoring_rules_are_ordered(store):
    out = E.run_job(E.resolve(cfg(defense="toy-noise", threat="adaptive", n_examples=24,
                                  overrides=[("steps", "5"), ("apgd_steps", "5"), ("eot_samples", "2"), ("eval_draws", "5"),
                                             ("sigma", "0.3")])),
                    store, progress=False)
    m = {k: v["value"] for k, v in out.metrics.items()}
    assert out.summary["eot_samples"] == 2 and out.summary["eval_draws"] == 5 and out.summary["gradient_path"] == "full"
    assert m["robust_accuracy"] == m["robust_accuracy_worst"]
    assert m["robust_accuracy_worst"] <= m["robust_accuracy_single"] + 1e-12
    assert m["robust_accuracy_worst"] <= m["robust_accuracy_majority"] + 1e-12
    assert m["robust_accuracy_worst"] <= m["clean_accuracy_worst"] + 1e-12
    # per attack: robust after it and every attack before it (AutoAttack-style, non-increasing)
    labels = ("pgd", "apgd-ce", "apgd-dlr", "diffhammer", "pgd@bpda", "apgd-ce@bpda", "apgd-dlr@bpda", "diffhammer@bpda")
    after = [m[f"robust_accuracy_{a}"] for a in labels]
    assert after == sorted(after, reverse=True) and after[-1] == m["robust_accuracy"]
    row = store.example_rows(out.job_id)[0]
    assert len(row.clean_preds) == 5 and next(iter(row.adv_preds)) == "pgd"


def _lost_everywhere(e, attacks) -> bool:
    from threat_models.scoring import score_draws

    ok = {r: getattr(e, f"clean_{r}") for r in ("single", "majority", "worst")}
    for a in attacks:
        s = score_draws(torch.tensor(e.adv_preds[a])[None], torch.tensor([e.label]))
        ok = {r: ok[r] and bool(s[r][0]) for r in ok}
    return not any(ok.values())


def test_cascade_skips_only_examples_lost_under_every_rule(store):
    over = [("steps", "4"), ("apgd_steps", "4"), ("eot_samples", "2"), ("eval_draws", "5"), ("sigma", "0.3"), ("eps", "0.12")]
    runs, jobs = {}, {}
    for cascade in ("true", "false"):
        jobs[cascade] = E.resolve(cfg(defense="toy-noise", threat="adaptive", n_examples=32, overrides=over + [("cascade", cascade)]))
        runs[cascade] = E.run_job(jobs[cascade], store, progress=False)
    assert runs["true"].job_id != runs["false"].job_id
    order = [p.label for p in jobs["true"].plan.attacks]
    # the adaptive default: every attack through the exact gradient, then through BPDA
    assert order == ["pgd", "apgd-ce", "apgd-dlr", "diffhammer", "pgd@bpda", "apgd-ce@bpda", "apgd-dlr@bpda", "diffhammer@bpda"]
    rows_on = store.example_rows(runs["true"].job_id)
    assert all(set(e.adv_preds) == set(order) for e in store.example_rows(runs["false"].job_id))
    skipped = 0
    for e in rows_on:
        have = [a for a in order if a in e.adv_preds]
        assert have == order[: len(have)] and have, "the cascade runs a prefix of the attacks, the first on everyone"
        if len(have) < len(order):
            skipped += 1
            assert _lost_everywhere(e, have), "an example some rule still counts as robust was skipped"
            assert not (e.robust_single or e.robust_majority or e.robust_worst)
    assert skipped > 0, "at this budget PGD breaks some examples under every rule"
    nfe_on, nfe_off = (store.get_job(runs[c].job_id).nfe["attack_purifications"] for c in ("true", "false"))
    assert nfe_on < nfe_off


def test_a_gradient_masking_defense_is_broken_by_bpda(store):
    over = [("eps", "0.15")]
    pgd = over + [("attacks", "pgd"), ("steps", "20"), ("step_size", "0.03")]
    full = E.run_job(E.resolve(cfg(defense="toy-quantize", threat="adaptive", overrides=pgd + [("also_paths", "")])), store, progress=False)
    bp = E.run_job(E.resolve(cfg(defense="toy-quantize", threat="bpda", overrides=over)), store, progress=False)
    assert full.summary["gradient_path"] == "full" and full.summary["also_paths"] == []
    assert bp.metrics["robust_accuracy"]["value"] < full.metrics["robust_accuracy"]["value"] - 0.2
    # the adaptive default also attacks through BPDA, so the masked gradient no longer decides
    both = E.run_job(E.resolve(cfg(defense="toy-quantize", threat="adaptive", overrides=pgd)), store, progress=False)
    assert both.summary["also_paths"] == ["bpda"]
    assert both.metrics["robust_accuracy"]["value"] < full.metrics["robust_accuracy"]["value"] - 0.2
    assert both.metrics["robust_accuracy"]["value"] <= both.metrics["robust_accuracy_pgd"]["value"]


def test_incompatible_pair_is_refused_with_reason():
    with pytest.raises(E.IncompatibleError, match="no 'adjoint' gradient path"):
        E.resolve(cfg(defense="toy-noise", threat="adaptive", overrides=[("gradient_path", "adjoint")]))
    with pytest.raises(E.IncompatibleError, match="stochastic"):
        E.resolve(cfg(defense="toy-noise", threat="adaptive", overrides=[("attacks", "autoattack-standard")]))


def test_surrogate_path_and_detection_auc(store):
    out = E.run_job(E.resolve(cfg(defense="toy-smooth", threat="adaptive", n_examples=32,
                                  overrides=[("gradient_path", "surrogate"), ("attacks", "pgd"), ("steps", "5"), ("detect", "true")])),
                    store, progress=False)
    assert out.summary["gradient_path"] == "surrogate"
    assert 0.0 <= out.metrics["detection_auc"]["value"] <= 1.0


def test_bad_input_gives_clear_errors():
    with pytest.raises(HarnessError, match="did you mean 'adaptive'"):
        E.resolve(cfg(threat="adaptve"))
    with pytest.raises(HarnessError, match="did you mean 'none'"):
        E.resolve(cfg(defense="nnoe"))
    with pytest.raises(HarnessError, match="out of range"):
        E.resolve(cfg(overrides=[("eps", "2")]))
    with pytest.raises(HarnessError, match="eps='nan' is not a valid float"):
        E.resolve(cfg(overrides=[("eps", "nan")]))
    with pytest.raises(HarnessError, match="unknown option"):
        E.resolve(cfg(overrides=[("epz", "0.1")]))
    with pytest.raises(HarnessError, match="key=value"):
        E.parse_set(["eps"])
    with pytest.raises(HarnessError, match="does-not-exist.pt"):
        E.resolve(cfg(weights="does-not-exist.pt"))


def test_l2_threat_uses_l2_budget(store):
    job = E.resolve(cfg(overrides=[("norm", "l2")]))
    assert job.spec.norm == "l2" and job.spec.eps == 1.0
    out = E.run_job(job, store, progress=False)
    assert max(r.l2 for r in store.example_rows(out.job_id)) <= 1.0 + 1e-5


def test_samples_are_stored_for_the_gallery(store):
    out = E.run_job(E.resolve(cfg(defense="toy-smooth", n_examples=16)), store, progress=False)
    samples = store.samples(out.job_id)
    assert [p for p, _ in samples] == list(range(8))
    assert samples[0][1]["purified"].shape == (1, 8, 8)


def test_a_defense_returning_nan_fails_the_job_loudly(store):
    job = E.resolve(cfg(defense="toy-nan", n_examples=8))
    with pytest.raises(HarnessError, match="non-finite"):
        E.run_job(job, store, progress=False)
    row = store.get_job(job.job_id)
    assert row.status == "failed" and "non-finite" in row.reason


def test_preprocessor_blind_adversarials_are_computed_once_and_reused(store):
    a = E.run_job(E.resolve(cfg(defense="toy-smooth", n_examples=40, overrides=[("batch_size", "16")])), store, progress=False)
    b = E.run_job(E.resolve(cfg(defense="toy-noise", n_examples=40, overrides=[("batch_size", "16")])), store, progress=False)
    assert store.get_job(a.job_id).nfe["adv_reused"] == 0
    assert store.get_job(b.job_id).nfe["adv_reused"] == 3  # all three batches came from the cache
    ra, rb = store.example_rows(a.job_id), store.example_rows(b.job_id)
    assert [(r.linf, r.l2) for r in ra] == [(r.linf, r.l2) for r in rb]
    assert a.curves == b.curves
    # a different seed is a different attack: no reuse
    c = E.run_job(E.resolve(cfg(defense="toy-noise", n_examples=40, seed=1, overrides=[("batch_size", "16")])), store, progress=False)
    assert store.get_job(c.job_id).nfe["adv_reused"] == 0


def test_a_defense_may_subsample_its_costly_cells_and_says_so():
    job = E.resolve(cfg(defense="toy-slow", threat="adaptive", n_examples=None))
    assert len(job.subset.y) == 24 and any("n_examples 24" in n for n in job.notes)
    assert len(E.resolve(cfg(defense="toy-slow", threat="bpda", n_examples=None)).subset.y) == 256  # the dataset default
    explicit = E.resolve(cfg(defense="toy-slow", threat="adaptive", n_examples=40))
    assert len(explicit.subset.y) == 40 and not any("n_examples" in n for n in explicit.notes)
