"""What a job costs before it runs: network evaluations from the plan, and a time estimate.

:func:`estimate_nfe` counts, from the resolved plan alone, the images every stage sends
through the purifier and the classifier, as the run records them (``jobs.nfe``):

- clean scoring: ``eval_draws`` x n purifications;
- per planned attack on a defended path: ``attack.model_calls(eot)`` x n images through
  the purifier (PGD: restarts x (steps + 1) x EOT), then ``eval_draws`` x n to score its
  adversarial examples; a classifier-only attack purifies only for the scoring;
- with ``paired_reference`` on shifted inputs (or a purifier trained elsewhere): the
  reference configuration's purifications, as many again;
- the flag checks (:func:`harness.evaluation.batch.flag_checks`): n purifications for the
  zero-gradient probe on a defended path, and n more for a defense declared deterministic;
- ``purifier_nfe_images`` = the defense's ``nfe_per_call`` x all purifications.

The cascade (a later attack runs only on the examples still robust) is not known before
the run, so for a plan of several attacks the count is the cost of attacking every
example, an upper bound (``exact`` says whether it is the recorded number). A cell whose
preprocessor-blind adversarial examples are already cached costs less than predicted.
:func:`calibrate` times a few network calls on a device, and :func:`estimate_seconds`
turns the counts into seconds. :func:`large_plan_note` is the line ``harness run`` (with a
calibrated time) and ``harness grid`` print before a cell of at least
:data:`LARGE_PLAN_NFE` purifier NFE-images starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.core.defense import GradientPath
from harness.evaluation.resolve import ResolvedJob


def estimate_nfe(job: ResolvedJob) -> dict[str, Any]:
    """Network evaluations of ``job`` (see the module docstring); JSON-able."""
    n, draws, per_call = len(job.subset.y), job.draws, int(job.defense.nfe_per_call)
    attacks = []
    attack_pur = grad_pur = 0
    attack_clf = 0
    for pa in job.plan.attacks:
        eot = job.eot_for(pa.path)
        calls = int(pa.attack.model_calls(eot)) * n
        defended = pa.path is not GradientPath.CLASSIFIER
        through = defended and pa.attack.needs_gradients and pa.path is not GradientPath.BPDA
        attacks.append({"label": pa.label, "path": pa.path.value, "eot": eot, "model_images": calls,
                        "purifications": calls if defended else 0, "gradient": bool(pa.attack.needs_gradients),
                        "eval_purifications": draws * n})
        attack_pur += calls if defended else 0
        grad_pur += calls if through else 0
        attack_clf += calls
    eval_pur = draws * n * (1 + len(job.plan.attacks))
    # paired_reference: on shifted inputs, or with a defense trained elsewhere, the reference
    # configuration scores and attacks again (what batch.paired_reference counts)
    ref = job.spec.paired_reference and (job.shift.name != "none" or job.reference_defense is not None)
    ref_pur = attack_pur + eval_pur if ref else 0
    # the flag checks: one gradient probe on its path (a purification unless it is the
    # classifier alone), and one more purification of a deterministic defense
    from harness.evaluation.batch import gradient_check_path  # the path flag_checks probes

    probe = gradient_check_path(job)
    flag_pur = (n if probe is not None and probe is not GradientPath.CLASSIFIER else 0) + (0 if job.defense.stochastic else n)
    exact = len(job.plan.attacks) <= 1
    return {
        "n_examples": n, "eval_draws": draws, "nfe_per_purification": per_call,
        "attack_purifications": attack_pur, "purifier_gradient_purifications": grad_pur, "eval_purifications": eval_pur,
        **({"reference_purifications": ref_pur} if job.spec.paired_reference else {}),
        "classifier_images": attack_clf + eval_pur,
        "flag_purifications": flag_pur,
        "purifier_nfe_images": per_call * (attack_pur + eval_pur + ref_pur + flag_pur),
        "attacks": attacks, "exact": exact,
        **({} if exact else {"note": "every attack on every example: the cascade runs later attacks on fewer"}),
    }


@dataclass(frozen=True)
class Calibration:
    """Measured seconds per image on one device.

    ``defended_s``: the defended model's own forward (purify and classify, no graph), what
    scoring and gradient-free attacks pay; ``defended_grad_s``: path -> forward and
    backward to the input along that path; ``classify_grad_s``: the classifier alone with
    its gradient (classifier-only attacks).
    """

    device: str
    defended_s: float
    defended_grad_s: dict[str, float]
    classify_grad_s: float
    batch: int

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "batch": self.batch, "defended_s": round(self.defended_s, 8),
                "defended_grad_s": {k: round(v, 8) for k, v in self.defended_grad_s.items()},
                "classify_grad_s": round(self.classify_grad_s, 8)}


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, cuDNN autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def calibrate(job: ResolvedJob, device: str | torch.device | None = None, *, batch: int | None = None,
              repeats: int = 2) -> Calibration:
    """Time a few network calls of ``job``'s defended model on ``device`` (default: the job's).

    One batch of the job's own images (``batch``: default the spec's ``batch_size``, at
    most ``max_forward``) goes through the defended model's forward without a graph,
    through forward and backward along every defended path of the plan, and through the
    classifier with its gradient; each is timed as the fastest of ``repeats`` after a
    warm-up. The models are moved to the device and back.
    """
    dev = torch.device(device) if device is not None else job.device
    b = max(1, min(batch or job.spec.batch_size, job.spec.max_forward, len(job.subset.y)))
    x = job.subset.x[:b].to(dev)
    defense, clf = job.defense, job.classifier.module
    old = (_device_of(defense), _device_of(clf))
    defense.to(dev)
    clf.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    paths = sorted({pa.path for pa in job.plan.attacks if pa.path is not GradientPath.CLASSIFIER}, key=lambda p: p.value)

    def grad_of(fn):
        def run():
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(fn(xx).float().sum(), xx)
        return run

    try:
        with torch.no_grad():
            t_def = _timed(lambda: defense.classify(x, clf, path=None, generator=gen), repeats, dev)
        t_grad = {p.value: _timed(grad_of(lambda xx, p=p: defense.classify(xx, clf, path=p, generator=gen)), repeats, dev)
                  for p in paths}
        t_clf_g = _timed(grad_of(clf), repeats, dev)
    finally:
        defense.to(old[0])
        clf.to(old[1])
    return Calibration(str(dev), t_def / b, {k: v / b for k, v in t_grad.items()}, t_clf_g / b, b)


def estimate_seconds(nfe: dict[str, Any], cal: Calibration) -> float:
    """Network seconds for the counts of :func:`estimate_nfe` at the calibrated per-image costs."""
    total = nfe["eval_purifications"] * cal.defended_s
    for a in nfe["attacks"]:
        if a["path"] == GradientPath.CLASSIFIER.value:
            total += a["model_images"] * cal.classify_grad_s
        elif a["gradient"]:
            total += a["model_images"] * cal.defended_grad_s.get(a["path"], cal.defended_s)
        else:
            total += a["model_images"] * cal.defended_s
    return total


#: Purifier network evaluations (NFE-images) from which a plan is large: the run says what it will cost first.
LARGE_PLAN_NFE = 100_000


def large_plan_note(job, calibrate_on: str | None = None) -> str | None:
    """One line for a plan of at least :data:`LARGE_PLAN_NFE` purifier NFE-images (None below): its network
    evaluations and, with ``calibrate_on`` (a device), the network time a few timed calls predict.
    """
    cost = estimate_nfe(job)
    if cost["purifier_nfe_images"] < LARGE_PLAN_NFE:
        return None
    bound = "" if cost["exact"] else "at most "
    line = (f"large plan: {bound}{cost['purifier_nfe_images']:,} purifier NFE-images and {bound}{cost['classifier_images']:,} "
            "classifier images")
    if calibrate_on is not None:
        cal = calibrate(job, calibrate_on)
        secs = estimate_seconds(cost, cal)
        line += f"; estimated network time {secs / 3600:.2f} h on {cal.device} (calibrated on {cal.batch} images)"
    return line + "; finished batches are stored as they end (Ctrl-C, then the same command resumes); --dry-run --calibrate details it"
