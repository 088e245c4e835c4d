"""Job-level numbers from stored per-example rows (so a resumed job equals an uninterrupted one)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.evaluation.resolve import ResolvedJob
from harness.evaluation.stats import paired_change, roc_auc, wilson_interval
from threat_models.scoring import RULES, score_draws

Metric = tuple[float, float | None, float | None, int | None]


def accuracy_metrics(job: ResolvedJob, examples: list) -> dict[str, Metric]:
    """Clean and robust accuracy under every rule, the headline, and the per-attack accuracies.

    Per attack the accuracy is AutoAttack-style: robust after that attack and every one
    before it (an example the cascade skipped was lost already, so it stays lost).
    """
    n = len(examples)
    headline = job.spec.scoring
    metrics: dict[str, Metric] = {}

    def frac(name: str, k: int) -> None:
        lo, hi = wilson_interval(k, n)
        metrics[name] = (k / n if n else 0.0, lo, hi, n)

    for rule in RULES:
        frac(f"clean_accuracy_{rule}", sum(getattr(e, f"clean_{rule}") for e in examples))
        frac(f"robust_accuracy_{rule}", sum(getattr(e, f"robust_{rule}") for e in examples))
    metrics["clean_accuracy"] = metrics[f"clean_accuracy_{headline}"]
    metrics["robust_accuracy"] = metrics[f"robust_accuracy_{headline}"]
    still = [bool(getattr(e, f"clean_{headline}")) for e in examples]
    for pa in job.plan.attacks:
        idx = [i for i, e in enumerate(examples) if still[i] and pa.label in e.adv_preds]
        # one score_draws call per number of draws (every row of a job has the same), not per example
        by_len: dict[int, list[int]] = {}
        for i in idx:
            by_len.setdefault(len(examples[i].adv_preds[pa.label]), []).append(i)
        for rows in by_len.values():
            preds = torch.tensor([examples[i].adv_preds[pa.label] for i in rows])
            ok = score_draws(preds, torch.tensor([examples[i].label for i in rows]))[headline].tolist()
            for i, v in zip(rows, ok, strict=True):
                still[i] = bool(v)
        frac(f"robust_accuracy_{pa.label}", sum(still))
    return metrics


def reference_metrics(job: ResolvedJob, examples: list) -> dict[str, Metric]:
    """The ``paired_reference`` metrics, from each example's stored reference outcomes.

    Under the spec's headline rule: ``clean_accuracy_unshifted`` and
    ``robust_accuracy_unshifted`` (the reference configuration), the undefended
    classifier's ``classifier_clean_accuracy``, ``classifier_robust_accuracy`` (shifted)
    and ``..._unshifted`` (95% Wilson intervals), and the paired changes on the same
    examples, shifted minus reference, with 95% Newcombe intervals:
    ``clean_accuracy_change``, ``robust_accuracy_change`` (the defended model) and
    ``clean_accuracy_classifier_change``, ``robust_accuracy_classifier_change`` (the
    undefended classifier). Empty when the job has no reference outcomes.
    """
    refs = [getattr(e, "reference", None) for e in examples]
    if not examples or any(r is None for r in refs):
        return {}
    rule = job.spec.scoring
    n = len(examples)
    main = {k: [bool(getattr(e, f"{k}_{rule}")) for e in examples] for k in ("clean", "robust")}
    unshifted = {k: [bool(r["unshifted"][f"{k}_{rule}"]) for r in refs] for k in ("clean", "robust")}
    clf = {k: [bool(r["classifier"][k]) for r in refs] for k in ("clean", "robust")}
    clf_unshifted = {k: [bool(r["classifier_unshifted"][k]) for r in refs] for k in ("clean", "robust")}
    metrics: dict[str, Metric] = {}
    for k in ("clean", "robust"):
        for name, vals in ((f"{k}_accuracy_unshifted", unshifted[k]), (f"classifier_{k}_accuracy", clf[k]),
                           (f"classifier_{k}_accuracy_unshifted", clf_unshifted[k])):
            lo, hi = wilson_interval(sum(vals), n)
            metrics[name] = (sum(vals) / n, lo, hi, n)
        metrics[f"{k}_accuracy_change"] = paired_change(main[k], unshifted[k])
        metrics[f"{k}_accuracy_classifier_change"] = paired_change(clf[k], clf_unshifted[k])
    return metrics


def example_means(examples: list) -> dict[str, Metric]:
    """Mean perturbation sizes, image quality and the detector's ROC-AUC."""
    n = len(examples)
    metrics: dict[str, Metric] = {}
    if n:
        metrics["mean_linf"] = (float(np.mean([e.linf for e in examples])), None, None, n)
        metrics["mean_l2"] = (float(np.mean([e.l2 for e in examples])), None, None, n)
    for q in ("psnr_clean", "ssim_clean", "psnr_adv", "ssim_adv"):
        vals = [v for v in (getattr(e, q, None) for e in examples) if v is not None]
        if vals:
            metrics[q] = (float(np.mean(vals)), None, None, len(vals))
    det = [(e.detect_clean, e.detect_adv) for e in examples if e.detect_clean is not None]
    if det:
        metrics["detection_auc"] = (roc_auc([c for c, _ in det], [a for _, a in det]), None, None, len(det))
    return metrics


def merged_curves(batches: list) -> dict[str, list[tuple[float, int]]]:
    """Robust accuracy after every iteration, summed over the batches that ran the attack."""
    curves: dict[str, list[tuple[float, int]]] = {}
    for name in sorted({k for b in batches for k in b.curves}):
        per = [b.curves[name] for b in batches if name in b.curves]
        length = max(len(c) for c in per)
        tot = sum(b.n for b in batches if name in b.curves)
        curves[name] = [(sum(c[i] if i < len(c) else c[-1] for c in per) / tot, tot) for i in range(length)]
    return curves


def nfe_totals(job: ResolvedJob, batches: list) -> dict[str, Any]:
    """Purification and classifier counts summed over batches, and purifier network evaluations."""
    nfe: dict[str, Any] = {}
    for b in batches:
        for k, v in b.nfe.items():
            nfe[k] = nfe.get(k, 0) + v
    per_call = job.defense.nfe_per_call
    nfe["nfe_per_purification"] = per_call
    nfe["purifier_nfe_images"] = per_call * (
        nfe.get("attack_purifications", 0) + nfe.get("eval_purifications", 0) + nfe.get("reference_purifications", 0)
        + nfe.get("flag_purifications", 0))
    return nfe


def attack_stat_metrics(job: ResolvedJob, examples: list, batches: list) -> dict[str, Metric]:
    """An attack's own per-example statistics (``AttackResult.stats``, kept in each batch's ``extra``) as metrics.

    ``robust_accuracy_<label>_<name>``: the mean over the job's examples of the statistic, counted only on
    examples clean-correct under the headline rule (as every robust accuracy): DiffHammer's ``any_iterate``
    (robust under every draw of every iterate it tried, a count: 95% Wilson interval) and ``avg`` (one minus
    the best fraction of misclassifying draws: a mean, no interval).
    """
    n = len(examples)
    if not n:
        return {}
    clean = {e.position: bool(getattr(e, f"clean_{job.spec.scoring}")) for e in examples}  # position = batch * size + i
    sums: dict[str, float] = {}
    counted: dict[str, bool] = {}
    for b in batches:
        start = b.batch * job.spec.batch_size
        for label, per in ((getattr(b, "extra", None) or {}).get("attack_stats") or {}).items():
            for name, values in per.items():
                key = f"robust_accuracy_{label}_{name}"
                sums[key] = sums.get(key, 0.0) + sum(v for i, v in enumerate(values) if clean.get(start + i, False))
                counted[key] = name == "any_iterate"
    out: dict[str, Metric] = {}
    for key, total in sums.items():
        if counted[key]:
            k = int(round(total))
            lo, hi = wilson_interval(k, n)
            out[key] = (k / n, lo, hi, n)
        else:
            out[key] = (total / n, None, None, n)
    return out


def aggregate(job: ResolvedJob, examples: list, batches: list) -> dict:
    """Metrics, curves, NFE totals and flags (harness.evaluation.flags) from stored rows."""
    from harness.evaluation.flags import job_flags

    metrics = accuracy_metrics(job, examples)
    metrics.update(reference_metrics(job, examples))
    metrics.update(example_means(examples))
    metrics.update(attack_stat_metrics(job, examples, batches))
    curves = merged_curves(batches)
    return {"metrics": metrics, "curves": curves, "nfe": nfe_totals(job, batches), "flags": job_flags(job, batches, curves)}
