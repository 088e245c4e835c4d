"""One batch of a job, in named steps: shift, clean scoring, the attack plan, the kept
adversarial example, quality and detection, and the rows the store keeps.

:func:`run_batch` is what a worker runs per batch; every step is a function below.
Randomness comes from per-batch generators derived from (seed, batch, stream): the
attacker's purification noise per path (``attack-noise``), its random starts
(``attack-start``), library seeds per attack label, the evaluation draws
(``eval-noise``), the quality purifications (``quality``), the detector (``detect``),
the shift (``shift``) and the flag checks (``flags``, :func:`flag_checks`). The attack
streams do not depend on the defense, so under preprocessor-blind the adversarial
examples are shared by every defense.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from harness.core.attack import AttackRandomness, AttackResult, Budget
from harness.core.defense import GradientPath
from harness.core.env import package_versions
from harness.core.registry import HarnessError
from harness.core.shift import ShiftContext
from harness.evaluation import quality as Q
from harness.evaluation.forward import DefendedForward, derive_seed, make_generator
from harness.evaluation.plan import PlannedAttack
from harness.evaluation.resolve import ResolvedJob
from harness.store.codec import canonical, dumps
from threat_models.eot import eot_forward
from threat_models.scoring import RULES, predict_draws, score_draws

#: How many clean/adversarial/purified images per job are kept for the dashboard gallery.
N_SAMPLES = 8

#: Threat-spec fields that do not change the adversarial examples of a classifier-only attack.
_EVAL_ONLY_FIELDS = (
    "eval_draws", "scoring", "detect", "eot_samples", "eot_reduce", "name", "version", "max_forward", "cascade",
    "paired_reference",
)


@dataclass
class BatchState:
    """Everything the steps of one batch share."""

    job: ResolvedJob
    b: int
    x: torch.Tensor  # the (shifted) clean inputs the attacks start from
    y: torch.Tensor
    positions: np.ndarray
    tick: Callable[[int], None]
    models: dict[GradientPath, DefendedForward] = field(default_factory=dict)
    eval_model: DefendedForward | None = None
    start_gen: torch.Generator | None = None
    shift_info: dict = field(default_factory=dict)
    clean_preds: torch.Tensor | None = None
    clean: dict[str, torch.Tensor] = field(default_factory=dict)
    robust: dict[str, torch.Tensor] = field(default_factory=dict)
    advs: dict[str, AttackResult] = field(default_factory=dict)
    preds: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    ran: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> mask of the examples it attacked
    curves: dict[str, list[int]] = field(default_factory=dict)
    #: label -> statistic -> one value per example of the batch (AttackResult.stats, scattered)
    attack_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    pur_clean: torch.Tensor | None = None  # one purification of the clean inputs (quality)
    warned: list[str] = field(default_factory=list)  # "label: message" of pyautoattack's warnings
    purified_by_checks: int = 0

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def seed(self) -> int:
        return self.job.cfg.seed


# --------------------------------------------------------------------------- identity of shareable work
def adv_cache_key(job: ResolvedJob, b: int) -> str | None:
    """Identity of a batch's adversarial examples when they do not depend on the defense.

    When every planned attack is classifier-only (preprocessor-blind), the adversarial
    examples depend on the classifier, the attacks, the shift, the data, the batch and the
    seed, not on the defense, so every defense evaluated on the same cell reuses them.
    Other plans return None.
    """
    if not job.plan.classifier_only:
        return None
    attack = {k: v for k, v in job.spec.to_dict().items() if k not in _EVAL_ONLY_FIELDS}
    ident = canonical({
        "classifier": job.classifier.identity, "dataset": job.subset.identity, "attack": attack,
        "plan": [p.record() for p in job.plan.attacks], "shift": job.shift.identity(),
        "seed": job.cfg.seed, "batch": b, "packages": package_versions(),
    })
    return hashlib.sha256(dumps(ident).encode()).hexdigest()


# --------------------------------------------------------------------------- steps
def make_models(st: BatchState) -> None:
    """The defended forward of every planned path, the evaluation forward and the start generator."""
    job, dev, seed, b = st.job, st.device, st.seed, st.b
    clf = job.classifier.module
    for p in [job.path, *job.also_paths, *(pa.path for pa in job.plan.attacks)]:
        if p in st.models:
            continue
        stream = ("attack-noise",) if p is job.path else ("attack-noise", p.value)
        st.models[p] = DefendedForward(
            job.defense, clf, p, make_generator(dev, derive_seed(seed, b, *stream)),
            eot_samples=job.eot_for(p), eot_reduce=job.spec.eot_reduce, max_forward=job.spec.max_forward,
        )
    st.eval_model = DefendedForward(job.defense, clf, None, make_generator(dev, derive_seed(seed, b, "eval-noise")))
    st.start_gen = make_generator(dev, derive_seed(seed, b, "attack-start"))


def apply_shift(st: BatchState) -> None:
    """Replace the clean inputs by their shifted version (the identity shift returns them)."""
    job = st.job
    ctx = ShiftContext(
        generator=make_generator(st.device, derive_seed(st.seed, st.b, "shift")), positions=st.positions,
        subset_x=job.subset.x, subset_y=job.subset.y, dataset=job.cfg.dataset, seed=st.seed,
        subset_indices=np.asarray(job.subset.indices),
    )
    out = job.shift.apply(st.x, st.y, context=ctx)
    x, info = out if isinstance(out, tuple) else (out, {})
    if x.shape != st.x.shape or not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
        raise HarnessError(f"shift '{job.shift.name}' must return finite images of the same shape in [0, 1]")
    st.x, st.shift_info = x.detach(), dict(info)


def score_clean(st: BatchState) -> None:
    """R defended predictions of every clean input, scored under the three rules."""
    st.clean_preds = predict_draws(st.eval_model, st.x, st.job.draws, max_batch=st.job.spec.max_forward)
    st.clean = score_draws(st.clean_preds, st.y)
    st.robust = {rule: st.clean[rule].clone() for rule in RULES}


def _targets(st: BatchState, k: int, cascade: bool) -> torch.Tensor:
    """Indices the k-th attack runs on: all, or (the cascade) those some rule still counts robust."""
    if cascade and k > 0:
        return torch.nonzero(st.robust["single"] | st.robust["majority"] | st.robust["worst"]).flatten()
    return torch.arange(len(st.y), device=st.device)


def _run_one(st: BatchState, pa: PlannedAttack, idx: torch.Tensor, cached: dict | None) -> AttackResult:
    """One planned attack on the examples ``idx`` (or its cached result)."""
    job, dev = st.job, st.device
    if cached is not None and pa.label in cached:
        c = cached[pa.label]
        st.tick(pa.attack.ticks())
        return AttackResult(x_adv=torch.as_tensor(c["x_adv"]).to(dev), margin=torch.as_tensor(c["margin"]).to(dev), curve=list(c["curve"]))
    if len(idx) == 0:
        st.tick(pa.attack.ticks())
        return AttackResult(x_adv=st.x[idx], margin=torch.empty(0, device=dev))
    rng = AttackRandomness(generator=st.start_gen, seed=derive_seed(st.seed, st.b, pa.label) % (2**31))
    budget = Budget(norm=job.spec.norm, eps=job.spec.eps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pa.attack.run(st.models[pa.path], st.x[idx], st.y[idx], budget, rng, st.tick)
    _keep_warnings(st, pa.label, caught)
    if job.classifier.module.training or job.defense.training:
        raise HarnessError(f"attack {pa.label} left the classifier or the defense in training mode (attacks must not change it)")
    res = AttackResult(x_adv=res.x_adv.detach(), margin=res.margin.detach(), curve=list(res.curve),
                       stats={k: v.detach() for k, v in (res.stats or {}).items()})
    if not torch.isfinite(res.x_adv).all():
        raise HarnessError(f"attack {pa.label} produced non-finite images (defense '{job.defense.name}' gradients are NaN?)")
    if res.x_adv.shape != st.x[idx].shape or res.margin.shape != (len(idx),):
        raise HarnessError(
            f"attack {pa.label} returned shapes {tuple(res.x_adv.shape)}, {tuple(res.margin.shape)} for a batch of {len(idx)}"
        )
    return res


def _keep_warnings(st: BatchState, label: str, caught: list) -> None:
    """Pyautoattack's own checks ("there are N points with zero gradient!") become flags; other warnings are re-emitted."""
    for w in caught:
        if "pyautoattack" in str(w.filename).replace("\\", "/").split("/"):
            st.warned.append(f"{label}: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _record(st: BatchState, label: str, res: AttackResult, idx: torch.Tensor) -> None:
    """Scatter an attack's result back to the whole batch and score it with fresh draws."""
    n, dev, job = len(st.y), st.device, st.job
    x_full, m_full = st.x.clone(), torch.full((n,), float("-inf"), device=dev)
    x_full[idx], m_full[idx] = res.x_adv, res.margin.to(m_full.dtype)
    st.advs[label] = AttackResult(x_adv=x_full, margin=m_full, curve=res.curve)
    for name, v in (res.stats or {}).items():  # an example the cascade skipped was lost already: 0
        full = torch.zeros(n, device=dev)
        full[idx] = v.to(dev, full.dtype)
        st.attack_stats.setdefault(label, {})[name] = [float(a) for a in full.cpu()]
    mask = torch.zeros(n, dtype=torch.bool, device=dev)
    mask[idx] = True
    st.ran[label] = mask
    p_full = torch.full((n, job.draws), -1, dtype=torch.long, device=dev)
    s = {rule: torch.zeros(n, dtype=torch.bool, device=dev) for rule in RULES}  # skipped: lost already
    if len(idx):
        p_full[idx] = predict_draws(st.eval_model, res.x_adv, job.draws, max_batch=job.spec.max_forward).to(dev)
        for rule, v in score_draws(p_full[idx], st.y[idx]).items():
            s[rule][idx] = v
    st.preds[label], st.scores[label] = p_full, s
    for rule in RULES:
        st.robust[rule] &= s[rule]


def run_attacks(st: BatchState, cached: dict | None) -> None:
    """The plan in order, with AutoAttack's cascade.

    An attack after the first runs only on the examples that some scoring rule still
    counts as robust: the others are already lost under every rule, so skipping them
    changes no number. Classifier-only plans (shared by every defense through the
    adversarial cache) never depend on a defense's scores, so they run on all examples.
    """
    cascade = st.job.spec.cascade and not st.job.plan.classifier_only and cached is None
    for k, pa in enumerate(st.job.plan.attacks):
        idx = _targets(st, k, cascade)
        res = _run_one(st, pa, idx, cached)
        if res.curve:
            st.curves[pa.label] = res.curve  # robust counts over the attacked examples; the skipped ones are lost already
        _record(st, pa.label, res, idx)


def kept_adversarial(st: BatchState) -> tuple[torch.Tensor, list[str | None]]:
    """Per example, the first attack that breaks it under the worst-of-R rule, else the
    attack with the largest margin; returns the kept images and the breaking attack.
    """
    names = list(st.advs)
    chosen = torch.stack([st.advs[n].margin for n in names], 1).argmax(1).tolist()
    worst_attack: list[str | None] = [None] * len(st.y)
    # Python lists, not a tensor element per test (the same values, without a tensor op each)
    ran = {n: st.ran[n].tolist() for n in names}
    broken = {n: st.scores[n]["worst"].logical_not().tolist() for n in names}
    for i in range(len(st.y)):
        for j, n in enumerate(names):
            if ran[n][i] and broken[n][i]:
                worst_attack[i], chosen[i] = n, j
                break
    every = torch.stack([st.advs[n].x_adv for n in names])  # (attacks, B, C, H, W)
    x_adv = every[torch.tensor(chosen, dtype=torch.long, device=every.device), torch.arange(len(st.y), device=every.device)]
    return x_adv, worst_attack


def quality_and_detection(st: BatchState, x_adv: torch.Tensor) -> tuple[dict, torch.Tensor, tuple]:
    """PSNR/SSIM of one purification of the clean and of the kept adversarial input against
    the clean image (for every defense, so they can be compared on it), and the detector.
    """
    job, dev = st.job, st.device
    det = (None, None)
    with torch.no_grad():
        if job.spec.detect and job.defense.has_detection_score:
            g = make_generator(dev, derive_seed(st.seed, st.b, "detect"))
            det = (job.defense.detection_score(st.x, generator=g).float().cpu(),
                   job.defense.detection_score(x_adv, generator=g).float().cpu())
        gq = make_generator(dev, derive_seed(st.seed, st.b, "quality"))
        pur_clean = job.defense.purify_along(st.x, None, generator=gq).float()
        pur_adv = job.defense.purify_along(x_adv, None, generator=gq).float()
    st.pur_clean = pur_clean
    quality = {
        "psnr_clean": Q.psnr(pur_clean, st.x).cpu(), "ssim_clean": Q.ssim(pur_clean, st.x).cpu(),
        "psnr_adv": Q.psnr(pur_adv, st.x).cpu(), "ssim_adv": Q.ssim(pur_adv, st.x).cpu(),
    }
    return quality, pur_adv, det


def gradient_check_path(job: ResolvedJob) -> GradientPath | None:
    """The path :func:`flag_checks` takes the input gradient on: the main path if a gradient attack runs on it,
    else the first gradient attack's path (None: no attack of the plan uses gradients).
    """
    grads = [pa.path for pa in job.plan.attacks if pa.attack.needs_gradients]
    if not grads:
        return None
    return job.path if job.path in grads else grads[0]


def flag_checks(st: BatchState) -> dict:
    """The per-batch evidence for the job's flags (``batches.extra["flags"]``; see harness.evaluation.flags).

    Costs one forward and backward pass of the batch's clean inputs on the attack path
    (its own generator, EOT 1, the margin loss, which never saturates as cross-entropy
    does) and, for a defense declared deterministic, one more purification of the clean
    inputs (no autograd), compared with the one the quality step made. Nothing here
    touches the attacks' generators, so no accuracy changes.
    """
    job, dev = st.job, st.device
    out: dict = {"n": len(st.y)}
    path = gradient_check_path(job)
    gen = make_generator(dev, derive_seed(st.seed, st.b, "flags"))
    if path is not None:
        model = DefendedForward(job.defense, job.classifier.module, path, gen, max_forward=job.spec.max_forward)
        _, _, g = eot_forward(model, st.x, st.y, eot=1, reduce="loss", loss="cw", max_batch=job.spec.max_forward, need_grad=True)
        out["gradient_path"] = path.value
        out["zero_gradients"] = int((g.flatten(1).abs().sum(1) == 0).sum())
        st.purified_by_checks += model.purified
    if not job.defense.stochastic and st.pur_clean is not None:
        with torch.no_grad():
            again = job.defense.purify_along(st.x, None, generator=gen).float()
        st.purified_by_checks += len(st.y)
        out["randomness"] = float((again - st.pur_clean).abs().max()) if len(st.y) else 0.0
    if st.warned:
        out["autoattack"] = list(st.warned)
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def example_rows(st: BatchState, x_adv: torch.Tensor, worst_attack: list, quality: dict, det: tuple) -> list[dict]:
    """One dict per example, in the store's ``examples`` columns."""
    delta = (x_adv - st.x).flatten(1)
    linf, l2 = delta.abs().max(1).values.tolist(), delta.norm(dim=1).tolist()
    names = list(st.advs)
    # every tensor converted to Python values once (tolist gives what float()/bool()/int() of each element gives)
    labels, clean_preds = st.y.tolist(), st.clean_preds.tolist()
    preds = {n: st.preds[n].tolist() for n in names}
    ran = {n: st.ran[n].tolist() for n in names}
    flags = {f"{k}_{r}": getattr(st, k)[r].tolist() for k in ("clean", "robust") for r in RULES}
    dets = [None if d is None else d.tolist() for d in det]
    qual = {k: v.tolist() for k, v in quality.items()}
    rows = []
    for i in range(len(labels)):
        rows.append(dict(
            position=int(st.positions[i]), dataset_index=int(st.job.subset.indices[st.positions[i]]), label=labels[i],
            clean_preds=clean_preds[i],
            adv_preds={n: preds[n][i] for n in names if ran[n][i]},  # absent: skipped by the cascade
            worst_attack=worst_attack[i], linf=linf[i], l2=l2[i],
            **{k: v[i] for k, v in flags.items()},
            detect_clean=None if dets[0] is None else dets[0][i],
            detect_adv=None if dets[1] is None else dets[1][i],
            **{k: v[i] for k, v in qual.items()},
        ))
    return rows


def sample_rows(st: BatchState, x_orig: torch.Tensor, x_adv: torch.Tensor, pur_adv: torch.Tensor) -> list[dict]:
    """Images of the first :data:`N_SAMPLES` examples of the job, for the gallery."""
    out = []
    for i in range(len(st.y)):
        if st.positions[i] < N_SAMPLES:
            images = {"clean": _to_uint8(st.x[i]), "adversarial": _to_uint8(x_adv[i]), "purified": _to_uint8(pur_adv[i])}
            if st.job.shift.name != "none":
                images["original"] = _to_uint8(x_orig[i])
            out.append({"position": int(st.positions[i]), "images": images})
    return out


# --------------------------------------------------------------------------- paired reference
def _undefended(st: BatchState) -> dict[str, list[bool]]:
    """The undefended classifier on the state's inputs: clean, and robust to the plan's attacks on it alone.

    A classifier-only plan's adversarial examples are the classifier's already; otherwise
    the plan's main-path attacks run again on the classifier alone, with the same seeds.
    """
    job, dev = st.job, st.device
    clf = job.classifier.module
    with torch.no_grad():
        clean = clf(st.x).argmax(1) == st.y
    robust = clean.clone()
    if job.plan.classifier_only:
        advs = [st.advs[pa.label].x_adv for pa in job.plan.attacks]
    else:
        model = DefendedForward(job.defense, clf, GradientPath.CLASSIFIER, None, max_forward=job.spec.max_forward)
        gen = make_generator(dev, derive_seed(st.seed, st.b, "attack-start"))
        budget = Budget(norm=job.spec.norm, eps=job.spec.eps)
        advs = []
        for pa in job.plan.attacks:
            if pa.path is job.path:
                rng = AttackRandomness(generator=gen, seed=derive_seed(st.seed, st.b, pa.label) % (2**31))
                advs.append(pa.attack.run(model, st.x, st.y, budget, rng, lambda k: None).x_adv.detach())
    with torch.no_grad():
        for x_adv in advs:
            robust &= clf(x_adv).argmax(1) == st.y
    return {"clean": clean.tolist(), "robust": robust.tolist()}


def paired_reference(st: BatchState, x_orig: torch.Tensor) -> tuple[list[dict], int]:
    """Per example, the reference outcomes of ``paired_reference`` (stored in the examples' ``reference``),
    and the number of images the reference purified (for the NFE totals).

    ``unshifted``: the reference defense (the job's own, or for a transfer cell the one
    trained on the evaluated dataset) on the unshifted inputs, attacked with the same
    generators as the main run, under the three scoring rules; ``classifier`` and
    ``classifier_unshifted``: the undefended classifier on the shifted and the unshifted
    inputs. When nothing differs from the main run, its outcomes are reused.
    """
    job = st.job
    shifted = not torch.equal(x_orig, st.x)
    ref_job = job if job.reference_defense is None else dataclasses.replace(job, defense=job.reference_defense)
    if not shifted and job.reference_defense is None:
        ref = st
    else:
        ref = BatchState(job=ref_job, b=st.b, x=x_orig, y=st.y, positions=st.positions, tick=lambda k: None)
        make_models(ref)
        score_clean(ref)
        reuse = None
        if not shifted and job.plan.classifier_only:  # the same classifier-only attacks on the same inputs
            reuse = {n: {"x_adv": r.x_adv, "margin": r.margin, "curve": r.curve} for n, r in st.advs.items()}
        run_attacks(ref, reuse)
    clf_shifted = _undefended(st)
    clf_unshifted = _undefended(ref) if shifted else clf_shifted
    purified = 0 if ref is st else sum(m.purified for m in ref.models.values()) + ref.eval_model.purified
    rows = []
    for i in range(len(st.y)):
        rows.append({
            "unshifted": {f"{k}_{r}": bool(getattr(ref, k)[r][i]) for k in ("clean", "robust") for r in RULES},
            "classifier": {k: bool(v[i]) for k, v in clf_shifted.items()},
            "classifier_unshifted": {k: bool(v[i]) for k, v in clf_unshifted.items()},
        })
    return rows, purified


def run_batch(
    job: ResolvedJob,
    b: int,
    x: torch.Tensor,
    y: torch.Tensor,
    positions: np.ndarray,
    tick: Callable[[int], None],
    cached_adv: dict | None = None,
) -> dict:
    """Attack and score one batch; return the rows the store keeps for it.

    ``cached_adv`` (label -> {"x_adv", "margin", "curve"}) replaces the attacks with
    adversarial examples computed earlier for another defense (see :func:`adv_cache_key`).
    The returned dict carries ``adv_cache`` (key, entry) when it computed a shareable one.
    """
    t0 = time.perf_counter()
    st = BatchState(job=job, b=b, x=x, y=y, positions=positions, tick=tick)
    make_models(st)
    x_orig = st.x
    apply_shift(st)
    score_clean(st)
    run_attacks(st, cached_adv)
    x_adv, worst_attack = kept_adversarial(st)
    quality, pur_adv, det = quality_and_detection(st, x_adv)
    flags = flag_checks(st)
    key = adv_cache_key(job, b)
    adv_entry = None
    if key is not None and cached_adv is None:
        adv_entry = (key, {
            n: {"x_adv": r.x_adv.cpu().numpy(), "margin": r.margin.cpu().numpy(), "curve": list(r.curve)} for n, r in st.advs.items()
        })
    nfe = {
        "attack_purifications": sum(m.purified for m in st.models.values()),
        "eval_purifications": st.eval_model.purified,
        "classifier_images": sum(m.classified for m in st.models.values()) + st.eval_model.classified,
        "adv_reused": int(cached_adv is not None),
        "flag_purifications": st.purified_by_checks,
    }
    extra = {"shift": st.shift_info} if st.shift_info else {}
    extra["flags"] = flags
    if st.attack_stats:
        extra["attack_stats"] = st.attack_stats
    examples = example_rows(st, x_adv, worst_attack, quality, det)
    if job.spec.paired_reference:
        refs, nfe["reference_purifications"] = paired_reference(st, x_orig)
        for row, ref in zip(examples, refs):
            row["reference"] = ref
    return dict(
        examples=examples, curves=st.curves, nfe=nfe,
        seconds=time.perf_counter() - t0, samples=sample_rows(st, x_orig, x_adv, pur_adv), adv_cache=adv_entry, extra=extra,
    )
