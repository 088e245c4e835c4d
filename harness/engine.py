"""The evaluation engine: one job = (defense, threat, dataset, classifier, seeds).

:func:`resolve` turns a :class:`RunConfig` into a :class:`ResolvedJob`: it loads the
evaluation subset and the classifier, builds and sets up the defense, resolves the
threat spec for the dataset (with ``--set`` overrides), picks the gradient path, and
computes the job identity (a sha256 over everything that can change the number).
:func:`run_job` evaluates it batch by batch, writing each finished batch to the store,
so an interrupted job resumes where it stopped; aggregate metrics are always computed
from the stored per-example rows, so a resumed job and an uninterrupted one agree.

Randomness: every batch gets its own generators, derived from (seed, batch index,
stream), for the attack's random start, the attack's purification noise (EOT) and the
evaluation draws, so evaluation noise is independent of the noise the attacker saw and
a batch recomputed after an interruption is bit-identical on the same machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from harness.env import environment, package_versions
from harness.registry import HarnessError, suggest
from harness.store import Store, dumps, wilson_interval
from harness.types import DEFENSES, Defense, GradientPath, SetupContext, config_fields, parse_gradient_path
from harness import quality as Q
from threat_models import attacks as A
from threat_models.specs import THREATS, ThreatSpec, spec_fields

#: How many clean/adversarial/purified images per job are kept for the dashboard gallery.
N_SAMPLES = 8


class IncompatibleError(HarnessError):
    """This (defense, threat) pair cannot run; the message is the reason."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a user chooses for one job (the CLI's ``harness run`` flags)."""

    defense: str = "none"
    threat: str = "preprocessor-blind"
    dataset: str = "digits"
    classifier: str | None = None
    weights: str | None = None
    model_dir: str | None = None
    data_dir: str | None = None
    weights_dir: str | None = None
    n_examples: int | None = None
    seed: int = 0
    data_seed: int = 0
    device: str = "cpu"
    overrides: tuple[tuple[str, str], ...] = ()
    plugins: tuple[str, ...] = ()


@dataclass
class ResolvedJob:
    cfg: RunConfig
    subset: Any  # harness.data.EvalSubset
    dataset_info: Any  # harness.data.DatasetInfo
    classifier: Any  # harness.classifiers.LoadedClassifier
    defense: Defense
    spec: ThreatSpec
    path: GradientPath
    eot: int
    draws: int
    identity: dict
    job_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    notes: list[str] = field(default_factory=list)
    #: further paths every attack also runs through (spec.also_paths that apply here)
    also_paths: tuple[GradientPath, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "defense": self.defense.name,
            "defense_config": self.identity["defense"]["config"],
            "threat": self.spec.name,
            "threat_spec": self.spec.to_dict(),
            "dataset": self.cfg.dataset,
            "classifier": self.classifier.name,
            "n_examples": int(len(self.subset.y)),
            "gradient_path": self.path.value,
            "also_paths": [p.value for p in self.also_paths],
            "eot_samples": self.eot,
            "eval_draws": self.draws,
            "stochastic": self.defense.stochastic,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- resolution
def split_overrides(overrides: tuple[tuple[str, str], ...], defense_cls: type[Defense]) -> tuple[dict, dict]:
    """Route ``--set key=value`` pairs to the threat spec or the defense config.

    ``threat.key`` / ``defense.key`` are explicit; a bare key goes wherever it exists
    (an ambiguous bare key is an error, an unknown one suggests the closest).
    """
    threat_keys = set(spec_fields())
    defense_keys = set(config_fields(defense_cls.Config))
    t: dict[str, str] = {}
    d: dict[str, str] = {}
    for key, value in overrides:
        if key.startswith("threat."):
            t[key[7:]] = value
        elif key.startswith("defense."):
            d[key[8:]] = value
        elif key in threat_keys and key in defense_keys:
            raise HarnessError(f"--set {key} is both a threat and a defense option; write threat.{key} or defense.{key}")
        elif key in threat_keys:
            t[key] = value
        elif key in defense_keys:
            d[key] = value
        else:
            known = sorted(threat_keys | defense_keys)
            raise HarnessError(f"--set {key}: unknown option{suggest(key, known)} (threat: {', '.join(sorted(threat_keys))}; defense '{defense_cls.name}': {', '.join(sorted(defense_keys)) or 'none'})")
    return t, d


def parse_set(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise HarnessError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return tuple(out)


def check_compatible(defense_cls: type[Defense], spec: ThreatSpec) -> GradientPath:
    """Return the gradient path the pair will use, or raise IncompatibleError with the reason."""
    if spec.gradient_path == "auto":
        path = defense_cls.strongest_path()
    else:
        path = parse_gradient_path(spec.gradient_path)
    if path not in defense_cls.supported_paths():
        have = ", ".join(sorted(p.value for p in defense_cls.supported_paths()))
        raise IncompatibleError(
            f"defense '{defense_cls.name}' cannot run under threat '{spec.name}': it has no '{path.value}' gradient path (supports: {have})"
        )
    if "autoattack-standard" in spec.attacks and defense_cls.stochastic:
        raise IncompatibleError(
            f"defense '{defense_cls.name}' is stochastic; autoattack-standard assumes a deterministic model (use autoattack-rand)"
        )
    return path


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device '{name}' requested but CUDA is not available on this machine")
    return dev


def resolve(cfg: RunConfig) -> ResolvedJob:
    """Load and validate everything a job needs; raise HarnessError on bad input."""
    from harness import classifiers as C
    from harness import data as D
    from harness.plugins import load_builtin, load_plugin

    load_builtin()
    for p in cfg.plugins:
        load_plugin(p)
    defense_cls = DEFENSES.get(cfg.defense)
    threat_model = THREATS.get(cfg.threat)
    info = D.DATASETS.get(cfg.dataset)
    device = _device(cfg.device)

    t_over, d_over = split_overrides(cfg.overrides, defense_cls)
    spec = threat_model.resolve(info.family, t_over)
    spec.check_eps_for(int(np.prod(info.image_shape)))
    path = check_compatible(defense_cls, spec)
    defense = defense_cls.from_dict(d_over)

    n_examples, n_note = cfg.n_examples, None
    if n_examples is None and cfg.threat in defense_cls.default_examples and defense_cls.default_examples[cfg.threat] < info.default_n:
        n_examples = defense_cls.default_examples[cfg.threat]
        n_note = (f"n_examples {n_examples}: '{defense_cls.name}' subsamples '{cfg.threat}' cells by default "
                  f"(the dataset default is {info.default_n}; --n-examples to change)")
    subset = D.eval_subset(cfg.dataset, n_examples, cfg.data_seed, cfg.data_dir)
    clf_name = cfg.classifier or C.default_classifier(cfg.dataset)
    clf = C.load_classifier(clf_name, dataset=cfg.dataset, weights=cfg.weights, model_dir=cfg.model_dir, device=device)

    from pathlib import Path

    ctx = SetupContext(
        classifier=clf.module, dataset=cfg.dataset, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
        device=device, weights_dir=Path(cfg.weights_dir) if cfg.weights_dir else None,
    )
    defense.setup(ctx)
    defense.to(device).eval()
    for p in defense.parameters():
        p.requires_grad_(False)

    notes = ([n_note] if n_note else []) + list(defense.setup_notes)
    stochastic = defense.stochastic
    eot = spec.eot_samples if (stochastic and path is not GradientPath.CLASSIFIER) else 1
    draws = spec.eval_draws if stochastic else 1
    if eot != spec.eot_samples:
        notes.append(f"eot_samples {spec.eot_samples} -> 1: the attacked model is deterministic")
    if draws != spec.eval_draws:
        notes.append(f"eval_draws {spec.eval_draws} -> 1: defense '{defense.name}' is deterministic")
    if spec.detect and not defense.has_detection_score:
        notes.append(f"detect=true ignored: defense '{defense.name}' declares no detection score")
    also: list[GradientPath] = []
    for name in spec.also_paths:
        p = parse_gradient_path(name)
        if path is GradientPath.CLASSIFIER:
            notes.append(f"also_paths {name} ignored: the main attack is classifier-only (nothing defended to attack)")
        elif p is path or p in also:
            continue
        elif p not in defense.supported_paths():
            notes.append(f"also_paths {name} ignored: defense '{defense.name}' has no {name} gradient path")
        else:
            also.append(p)

    identity = {
        "defense": defense.identity(),
        "threat": spec.to_dict(),
        "effective": {"gradient_path": path.value, "also_paths": [p.value for p in also], "eot_samples": eot, "eval_draws": draws},
        "dataset": subset.identity,
        "classifier": clf.identity,
        "seed": cfg.seed,
        "packages": package_versions(),
    }
    job_id = hashlib.sha256(dumps(identity).encode()).hexdigest()
    return ResolvedJob(
        cfg=cfg, subset=subset, dataset_info=info, classifier=clf, defense=defense, spec=spec, path=path,
        eot=eot, draws=draws, identity=identity, job_id=job_id, device=device, notes=notes, also_paths=tuple(also),
    )


# --------------------------------------------------------------------------- models
class DefendedForward(nn.Module):
    """[0,1] images -> logits of the defended model along one gradient path.

    Holds a generator so each call draws fresh purification noise (EOT samples stacked
    along the batch get independent noise) and counts purified images for NFE totals.
    """

    def __init__(self, defense: Defense, classifier: nn.Module, path: GradientPath, generator: torch.Generator | None):
        super().__init__()
        self.defense, self.classifier, self.path, self.generator = defense, classifier, path, generator
        self.purified = 0
        self.classified = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.classified += x.shape[0]
        if self.path is GradientPath.CLASSIFIER:
            return self.classifier(x)
        self.purified += x.shape[0]
        logits = self.defense.classify(x, self.classifier, path=self.path, generator=self.generator)
        if not torch.isfinite(logits).all():
            raise HarnessError(f"defense '{self.defense.name}' produced non-finite outputs (NaN/inf) on the {self.path.value} path")
        return logits


def derive_seed(seed: int, *parts: Any) -> int:
    h = hashlib.sha256(dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- one batch
def _attack_names(spec: ThreatSpec) -> list[str]:
    names: list[str] = []
    for a in spec.attacks:
        names += ["apgd-ce", "apgd-dlr"] if a == "autoattack-rand" else [a]
    return list(dict.fromkeys(names))


def attack_plan(job: ResolvedJob) -> list[tuple[str, str, GradientPath]]:
    """(label, attack, path) in the order they run: every attack through the main path,
    then again through each of ``also_paths`` (labelled ``attack@path``)."""
    plan = [(a, a, job.path) for a in _attack_names(job.spec)]
    for p in job.also_paths:
        plan += [(f"{a}@{p.value}", a, p) for a in _attack_names(job.spec)]
    return plan


def _attack_ticks(spec: ThreatSpec, attack: str) -> int:
    return (spec.steps + 1) * spec.restarts if attack == "pgd" else spec.apgd_steps


#: Threat-spec fields that do not change the adversarial examples of a classifier-only attack.
_EVAL_ONLY_FIELDS = ("eval_draws", "scoring", "detect", "eot_samples", "eot_reduce", "name", "version", "max_forward", "cascade")


def adv_cache_key(job: ResolvedJob, b: int) -> str | None:
    """Identity of a batch's adversarial examples when they do not depend on the defense.

    Under a classifier-only attack (preprocessor-blind) the adversarial examples depend on
    the classifier, the attack, the data, the batch and the seed, not on the defense, so
    every defense evaluated on the same cell reuses them. Other paths return None.
    """
    if job.path is not GradientPath.CLASSIFIER:
        return None
    attack = {k: v for k, v in job.spec.to_dict().items() if k not in _EVAL_ONLY_FIELDS}
    ident = {
        "classifier": job.classifier.identity, "dataset": job.subset.identity, "attack": attack,
        "seed": job.cfg.seed, "batch": b, "packages": package_versions(),
    }
    return hashlib.sha256(dumps(ident).encode()).hexdigest()


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

    ``cached_adv`` (attack -> {"x_adv", "margin", "curve"}) replaces the attacks with
    adversarial examples computed earlier for another defense (see :func:`adv_cache_key`).
    The returned dict carries ``adv_cache`` (key, entry) when it computed a shareable one.
    """
    spec, dev, seed = job.spec, x.device, job.cfg.seed
    clf = job.classifier.module
    t0 = time.perf_counter()
    # The attack seeds do not depend on the defense: under preprocessor-blind the
    # adversarial examples are then shared by every defense (same classifier, data, spec).
    attack_models = {job.path: DefendedForward(job.defense, clf, job.path, _generator(dev, derive_seed(seed, b, "attack-noise")))}
    for p in job.also_paths:
        attack_models[p] = DefendedForward(job.defense, clf, p, _generator(dev, derive_seed(seed, b, "attack-noise", p.value)))
    eval_model = DefendedForward(job.defense, clf, GradientPath.FULL, _generator(dev, derive_seed(seed, b, "eval-noise")))
    start_gen = _generator(dev, derive_seed(seed, b, "attack-start"))

    clean_preds = A.predict_draws(eval_model, x, job.draws, max_batch=spec.max_forward)
    clean = A.score_draws(clean_preds, y)

    advs: dict[str, A.AttackResult] = {}
    preds: dict[str, torch.Tensor] = {}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    ran: dict[str, torch.Tensor] = {}  # attack -> mask of the examples it attacked
    curves: dict[str, list[int]] = {}
    robust = {rule: clean[rule].clone() for rule in RULES}
    # AutoAttack's cascade: an attack after the first runs only on the examples that some
    # scoring rule still counts as robust. The others are already lost under every rule,
    # so skipping them changes no number. Classifier-only attacks (shared by every defense
    # through the adversarial cache) never depend on a defense's scores, so they run on all.
    cascade = spec.cascade and job.path != GradientPath.CLASSIFIER and cached_adv is None
    all_idx = torch.arange(len(y), device=dev)
    for k, (name, attack, path) in enumerate(attack_plan(job)):
        attack_model = attack_models[path]
        if cascade and k > 0:
            idx = torch.nonzero(robust["single"] | robust["majority"] | robust["worst"]).flatten()
        else:
            idx = all_idx
        xs, ys = x[idx], y[idx]
        if cached_adv is not None and name in cached_adv:
            c = cached_adv[name]
            res = A.AttackResult(x_adv=torch.as_tensor(c["x_adv"]).to(dev), margin=torch.as_tensor(c["margin"]).to(dev), curve=list(c["curve"]))
            if res.curve:
                curves[name] = res.curve
            tick(_attack_ticks(spec, attack))
        elif len(idx) == 0:
            res = A.AttackResult(x_adv=xs, margin=torch.empty(0, device=dev))
            tick(_attack_ticks(spec, attack))
        elif attack == "pgd":
            res = A.pgd(
                attack_model, xs, ys, norm=spec.norm, eps=spec.eps, steps=spec.steps, step_size=spec.step_size,
                restarts=spec.restarts, rand_start=spec.random_start, loss=spec.loss, eot=job.eot,
                eot_reduce=spec.eot_reduce, generator=start_gen, progress=lambda: tick(1), max_batch=spec.max_forward,
            )
            curves[name] = res.curve  # robust counts over the attacked examples; the skipped ones are lost already
        elif attack in ("apgd-ce", "apgd-dlr"):
            res = A.apgd(
                attack_model, xs, ys, loss=attack.split("-")[1], norm=spec.norm, eps=spec.eps, steps=spec.apgd_steps,
                eot=job.eot, seed=derive_seed(seed, b, name) % (2**31),
            )
            tick(spec.apgd_steps)
        else:  # autoattack-standard
            res = A.autoattack_standard(attack_model, xs, ys, norm=spec.norm, eps=spec.eps, seed=derive_seed(seed, b, name) % (2**31))
            tick(spec.apgd_steps)
        if not torch.isfinite(res.x_adv).all():
            raise HarnessError(f"attack {name} produced non-finite images (defense '{job.defense.name}' gradients are NaN?)")
        # scatter back to the whole batch: a skipped example keeps its clean image, margin -inf
        x_full, m_full = x.clone(), torch.full((len(y),), float("-inf"), device=dev)
        x_full[idx], m_full[idx] = res.x_adv, res.margin.to(m_full.dtype)
        advs[name] = A.AttackResult(x_adv=x_full, margin=m_full, curve=res.curve)
        mask = torch.zeros(len(y), dtype=torch.bool, device=dev)
        mask[idx] = True
        ran[name] = mask
        p_full = torch.full((len(y), job.draws), -1, dtype=torch.long, device=dev)
        s = {rule: torch.zeros(len(y), dtype=torch.bool, device=dev) for rule in RULES}  # skipped: lost already
        if len(idx):
            p_full[idx] = A.predict_draws(eval_model, res.x_adv, job.draws, max_batch=spec.max_forward).to(dev)
            for rule, v in A.score_draws(p_full[idx], ys).items():
                s[rule][idx] = v
        preds[name] = p_full
        scores[name] = s
        for rule in RULES:
            robust[rule] &= s[rule]

    # the adversarial example kept per example: the first attack that breaks it under the
    # worst-of-R rule, else the one with the largest margin
    names = list(advs)
    margins = torch.stack([advs[n].margin for n in names], 1)
    chosen_idx = margins.argmax(1)
    worst_attack: list[str | None] = [None] * len(y)
    for i in range(len(y)):
        for j, n in enumerate(names):
            if bool(ran[n][i]) and not bool(scores[n]["worst"][i]):
                worst_attack[i] = n
                chosen_idx[i] = j
                break
    x_adv = torch.stack([advs[names[int(chosen_idx[i])]].x_adv[i] for i in range(len(y))])
    delta = (x_adv - x).flatten(1)
    linf, l2 = delta.abs().max(1).values, delta.norm(dim=1)

    det_clean = det_adv = None
    if spec.detect and job.defense.has_detection_score:
        with torch.no_grad():
            g = _generator(dev, derive_seed(seed, b, "detect"))
            det_clean = job.defense.detection_score(x, generator=g).float().cpu()
            det_adv = job.defense.detection_score(x_adv, generator=g).float().cpu()

    # image quality: one purification of the clean and of the kept adversarial input,
    # compared with the clean image (for every defense, so they can be compared on it)
    with torch.no_grad():
        gq = _generator(dev, derive_seed(seed, b, "quality"))
        pur_clean = job.defense.purify(x, generator=gq).float()
        pur_adv = job.defense.purify(x_adv, generator=gq).float()
        quality = {
            "psnr_clean": Q.psnr(pur_clean, x).cpu(), "ssim_clean": Q.ssim(pur_clean, x).cpu(),
            "psnr_adv": Q.psnr(pur_adv, x).cpu(), "ssim_adv": Q.ssim(pur_adv, x).cpu(),
        }

    examples = []
    for i in range(len(y)):
        examples.append(
            dict(
                position=int(positions[i]),
                dataset_index=int(job.subset.indices[positions[i]]),
                label=int(y[i]),
                clean_preds=clean_preds[i].tolist(),
                adv_preds={n: preds[n][i].tolist() for n in names if bool(ran[n][i])},  # absent: skipped by the cascade
                worst_attack=worst_attack[i],
                linf=float(linf[i]),
                l2=float(l2[i]),
                clean_single=bool(clean["single"][i]),
                clean_majority=bool(clean["majority"][i]),
                clean_worst=bool(clean["worst"][i]),
                robust_single=bool(robust["single"][i]),
                robust_majority=bool(robust["majority"][i]),
                robust_worst=bool(robust["worst"][i]),
                detect_clean=None if det_clean is None else float(det_clean[i]),
                detect_adv=None if det_adv is None else float(det_adv[i]),
                **{k: float(v[i]) for k, v in quality.items()},
            )
        )

    samples = []
    for i in range(len(y)):
        if positions[i] < N_SAMPLES:
            samples.append(
                {"position": int(positions[i]), "images": {"clean": _to_uint8(x[i]), "adversarial": _to_uint8(x_adv[i]), "purified": _to_uint8(pur_adv[i])}}
            )

    adv_entry = None
    key = adv_cache_key(job, b)
    if key is not None and cached_adv is None:
        adv_entry = (key, {n: {"x_adv": r.x_adv.cpu().numpy(), "margin": r.margin.cpu().numpy(), "curve": list(r.curve)} for n, r in advs.items()})

    nfe = {
        "attack_purifications": sum(m.purified for m in attack_models.values()),
        "eval_purifications": eval_model.purified,
        "classifier_images": sum(m.classified for m in attack_models.values()) + eval_model.classified,
    }
    nfe["adv_reused"] = int(cached_adv is not None)
    return dict(examples=examples, curves=curves, nfe=nfe, seconds=time.perf_counter() - t0, samples=samples, adv_cache=adv_entry)


# --------------------------------------------------------------------------- aggregation
RULES = ("single", "majority", "worst")


def aggregate(job: ResolvedJob, examples: list, batches: list) -> dict:
    """Metrics, curves and NFE totals from stored rows (so resumed == uninterrupted)."""
    n = len(examples)
    headline = job.spec.scoring
    metrics: dict[str, tuple[float, float | None, float | None, int | None]] = {}

    def frac(name: str, k: int):
        lo, hi = wilson_interval(k, n)
        metrics[name] = (k / n if n else 0.0, lo, hi, n)

    for rule in RULES:
        frac(f"clean_accuracy_{rule}", sum(getattr(e, f"clean_{rule}") for e in examples))
        frac(f"robust_accuracy_{rule}", sum(getattr(e, f"robust_{rule}") for e in examples))
    metrics["clean_accuracy"] = metrics[f"clean_accuracy_{headline}"]
    metrics["robust_accuracy"] = metrics[f"robust_accuracy_{headline}"]
    # per attack, AutoAttack-style: robust after this attack and every one before it (an
    # example the cascade skipped was lost already, so it stays lost)
    still = [bool(getattr(e, f"clean_{headline}")) for e in examples]
    for a, _, _ in attack_plan(job):
        for i, e in enumerate(examples):
            if still[i] and a in e.adv_preds:
                still[i] = bool(A.score_draws(torch.tensor(e.adv_preds[a])[None], torch.tensor([e.label]))[headline][0])
        frac(f"robust_accuracy_{a}", sum(still))
    if n:
        metrics["mean_linf"] = (float(np.mean([e.linf for e in examples])), None, None, n)
        metrics["mean_l2"] = (float(np.mean([e.l2 for e in examples])), None, None, n)
    for q in ("psnr_clean", "ssim_clean", "psnr_adv", "ssim_adv"):
        vals = [getattr(e, q, None) for e in examples]
        vals = [v for v in vals if v is not None]
        if vals:
            metrics[q] = (float(np.mean(vals)), None, None, len(vals))
    det = [(e.detect_clean, e.detect_adv) for e in examples if e.detect_clean is not None]
    if det:
        from sklearn.metrics import roc_auc_score

        scores = [c for c, _ in det] + [a for _, a in det]
        labels = [0] * len(det) + [1] * len(det)
        metrics["detection_auc"] = (float(roc_auc_score(labels, scores)), None, None, len(det))

    curves: dict[str, list[tuple[float, int]]] = {}
    names = sorted({k for b in batches for k in b.curves})
    for name in names:
        per = [b.curves[name] for b in batches if name in b.curves]
        length = max(len(c) for c in per)
        tot = sum(b.n for b in batches if name in b.curves)
        curves[name] = [(sum(c[i] if i < len(c) else c[-1] for c in per) / tot, tot) for i in range(length)]

    nfe: dict[str, Any] = {}
    for b in batches:
        for k, v in b.nfe.items():
            nfe[k] = nfe.get(k, 0) + v
    per_call = job.defense.nfe_per_call
    nfe["nfe_per_purification"] = per_call
    nfe["purifier_nfe_images"] = per_call * (nfe.get("attack_purifications", 0) + nfe.get("eval_purifications", 0))
    return {"metrics": metrics, "curves": curves, "nfe": nfe}


# --------------------------------------------------------------------------- run
@dataclass
class JobOutcome:
    job_id: str
    status: str
    reused: bool
    summary: dict
    metrics: dict[str, dict[str, Any]]
    curves: dict[str, list[float]]
    timings: dict

    def as_json(self) -> dict[str, Any]:
        m = self.metrics
        out = {
            "job_id": self.job_id,
            "status": self.status,
            "reused": self.reused,
            **{k: self.summary[k] for k in ("defense", "threat", "dataset", "classifier", "n_examples")},
            "clean_accuracy": m.get("clean_accuracy", {}).get("value"),
            "robust_accuracy": m.get("robust_accuracy", {}).get("value"),
            "robust_accuracy_ci95": [m["robust_accuracy"]["lower"], m["robust_accuracy"]["upper"]] if "robust_accuracy" in m else None,
            "gradient_path": self.summary["gradient_path"],
            "eot_samples": self.summary["eot_samples"],
            "eval_draws": self.summary["eval_draws"],
            "scoring": self.summary["threat_spec"]["scoring"],
            "metrics": {k: v["value"] for k, v in m.items()},
            "timings": self.timings,
        }
        if "detection_auc" in m:
            out["detection_auc"] = m["detection_auc"]["value"]
        return out


def _job_fields(job: ResolvedJob) -> dict[str, Any]:
    return dict(
        defense=job.defense.name, threat=job.spec.name, dataset=job.cfg.dataset, classifier=job.classifier.name,
        seed=job.cfg.seed, n_examples=int(len(job.subset.y)), norm=job.spec.norm, eps=job.spec.eps,
        gradient_path="+".join([job.path.value] + [p.value for p in job.also_paths]), eot_samples=job.eot, eval_draws=job.draws, stochastic=job.defense.stochastic,
        adaptive=job.path is not GradientPath.CLASSIFIER and job.path is not GradientPath.BPDA,
        identity=job.identity, config=job.summary(),
    )


def _outcome(store: Store, job: ResolvedJob, reused: bool) -> JobOutcome:
    row = store.get_job(job.job_id)
    metrics = {k: {"value": m.value, "lower": m.lower, "upper": m.upper, "n": m.n} for k, m in store.metrics(job.job_id).items()}
    return JobOutcome(job.job_id, row.status, reused, job.summary(), metrics, store.curves(job.job_id), row.timings or {})


def iter_batches(
    job: ResolvedJob,
    skip: set[int] | frozenset[int] = frozenset(),
    *,
    adv_lookup: Callable[[str], dict | None] | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, dict]]:
    """Run the batches of ``job`` not in ``skip``, yielding ``(batch index, payload)``.

    This is the part of a job that runs on a worker (a local process, a Ray task); the
    payloads go to whoever owns the store (:func:`write_payload`, :func:`finish`).
    ``adv_lookup(key)`` returns previously computed adversarial examples for reuse.
    """
    from tqdm.auto import tqdm

    bs = job.spec.batch_size
    n = len(job.subset.y)
    n_batches = (n + bs - 1) // bs
    steps_per_batch = 0
    for _, a, _ in attack_plan(job):
        steps_per_batch += _attack_ticks(job.spec, a)
    todo = [b for b in range(n_batches) if b not in skip]
    bar = tqdm(total=len(todo) * steps_per_batch, disable=not progress, desc=f"{job.defense.name}/{job.spec.name}", unit="it", leave=False)
    try:
        for b in todo:
            lo, hi = b * bs, min(n, (b + 1) * bs)
            x = job.subset.x[lo:hi].to(job.device)
            y = job.subset.y[lo:hi].to(job.device)
            key = adv_cache_key(job, b)
            cached = adv_lookup(key) if (key is not None and adv_lookup is not None) else None
            yield b, run_batch(job, b, x, y, np.arange(lo, hi), bar.update, cached_adv=cached)
    finally:
        bar.close()


def n_batches(job: ResolvedJob) -> int:
    return (len(job.subset.y) + job.spec.batch_size - 1) // job.spec.batch_size


class _Row:
    """Attribute view of an in-memory row, so :func:`aggregate` reads payloads like stored rows."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def finish(job: ResolvedJob, store: Store, *, run_s: float, resumed: int, in_memory: list[dict] | None = None) -> None:
    """Aggregate a job's rows (stored, or ``in_memory`` payloads for --force) and mark it done."""
    n = len(job.subset.y)
    if in_memory is not None:
        examples = [_Row(**e) for bt in in_memory for e in bt["examples"]]
        batches = [_Row(n=len(bt["examples"]), curves=bt["curves"], nfe=bt["nfe"], seconds=bt["seconds"]) for bt in in_memory]
    else:
        examples, batches = store.example_rows(job.job_id), store.batch_rows(job.job_id)
    if len(examples) != n or len({e.position for e in examples}) != n:
        raise HarnessError(f"job {job.job_id[:12]}: {len(examples)} stored examples, expected {n}")
    agg = aggregate(job, examples, batches)
    batch_seconds = sum(b.seconds for b in batches)
    timings = {"total_s": batch_seconds, "this_run_s": run_s, "per_example_s": batch_seconds / max(n, 1), "resumed_batches": resumed}
    payload = dict(metrics=agg["metrics"], curves=agg["curves"], timings=timings, nfe=agg["nfe"], environment=environment(job.device), fields=_job_fields(job))
    if in_memory is not None:
        store.replace_job(job.job_id, in_memory, **payload)
    else:
        store.finish_job(job.job_id, **payload)


def run_job(
    job: ResolvedJob,
    store: Store,
    *,
    force: bool = False,
    progress: bool = True,
) -> JobOutcome:
    """Evaluate ``job`` in this process (resuming a partial run) and store it.

    A finished job in the store is reused unless ``force``; a forced rerun keeps the old
    rows until the new ones are complete, then swaps them in one transaction.
    """
    existing = store.get_job(job.job_id)
    if existing is not None and existing.status == "done" and not force:
        return _outcome(store, job, reused=True)
    in_memory = existing is not None and existing.status == "done"
    if not in_memory:
        store.begin_job(job.job_id, **_job_fields(job))
    done = set() if in_memory else store.done_batches(job.job_id)
    t_start = time.perf_counter()
    written: list[dict] = []
    try:
        for b, payload in iter_batches(job, done, adv_lookup=store.get_adv, progress=progress):
            if in_memory:
                written.append({"batch": b, **payload})
            else:
                store.write_batch(job.job_id, b, **payload)
        finish(job, store, run_s=time.perf_counter() - t_start, resumed=len(done), in_memory=written if in_memory else None)
    except HarnessError as exc:
        if not in_memory:
            store.fail_job(job.job_id, str(exc))
        raise
    except Exception as exc:
        if not in_memory:
            store.fail_job(job.job_id, f"{type(exc).__name__}: {exc}")
        raise
    return _outcome(store, job, reused=False)


def evaluate(cfg: RunConfig, store: Store | None = None, *, force: bool = False, progress: bool = False) -> JobOutcome:
    """Python API: resolve and run one job (an in-memory store if none is given)."""
    store = store or Store("sqlite://")
    return run_job(resolve(cfg), store, force=force, progress=progress)


def replace_config(cfg: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(cfg, **changes)
