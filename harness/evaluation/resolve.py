"""Resolution: a :class:`RunConfig` (what the user typed) -> a :class:`ResolvedJob` (what will run).

:func:`resolve` loads the evaluation subset and the classifier, resolves the threat spec
for the dataset with the ``--set`` overrides, builds the attack plan and the shift,
builds and sets up the defense, and computes the job identity: a sha256 over
everything that can change the number (the defense's name, version, config and source
hash; the resolved spec; every planned attack's identity; the shift; the effective
paths, EOT samples and draws; the data subset and file hash; the classifier weights'
sha256; the seed; package versions). Floats are canonicalised first, so ``eps=1/5``
and ``eps=0.2`` are the same job. Bad input raises a one-line ``HarnessError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.attack import ATTACKS
from harness.core.config import config_fields
from harness.core.defense import DEFENSES, Defense, GradientPath, SetupContext
from harness.core.env import package_versions
from harness.core.registry import HarnessError, MissingFileError, suggest
from harness.core.shift import SHIFTS, Shift
from harness.evaluation.plan import AttackPlan, IncompatibleError, build_plan
from harness.store.codec import canonical, dumps
from threat_models.specs import THREATS, ThreatSpec, spec_fields

__all__ = [
    "IncompatibleError", "ResolvedJob", "RunConfig", "parse_set", "plan_without_files", "resolve", "sharing_networks",
    "split_overrides",
]


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
    """A job ready to run: loaded data and models, the spec, the plan and the identity."""

    cfg: RunConfig
    subset: Any  # harness.data.EvalSubset
    dataset_info: Any  # harness.data.DatasetInfo
    classifier: Any  # harness.classifiers.LoadedClassifier
    defense: Defense
    spec: ThreatSpec
    plan: AttackPlan
    shift: Shift
    draws: int
    identity: dict
    job_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    notes: list[str] = field(default_factory=list)
    #: with ``paired_reference`` and a defense trained on another dataset: the same defense trained on this one
    reference_defense: Defense | None = None

    @property
    def path(self) -> GradientPath:
        """The main gradient path."""
        return self.plan.main_path

    @property
    def also_paths(self) -> tuple[GradientPath, ...]:
        """The further paths every attack also ran through."""
        return self.plan.also_paths

    def eot_for(self, path: GradientPath | None) -> int:
        """EOT samples per gradient on ``path`` (1 where the attacked model is deterministic)."""
        stochastic = self.defense.stochastic and path is not GradientPath.CLASSIFIER
        return self.spec.eot_samples if stochastic else 1

    @property
    def eot(self) -> int:
        """EOT samples per gradient on the main path."""
        return self.eot_for(self.path)

    def summary(self) -> dict[str, Any]:
        """What a run prints and stores as the job's configuration."""
        return {
            "defense": self.defense.name,
            "defense_config": self.identity["defense"]["config"],
            "threat": self.spec.name,
            "threat_spec": self.spec.to_dict(),
            "dataset": self.cfg.dataset,
            "data_seed": self.cfg.data_seed,
            "classifier": self.classifier.name,
            "n_examples": int(len(self.subset.y)),
            "gradient_path": self.path.value,
            "also_paths": [p.value for p in self.also_paths],
            "stored_gradient_path": self.plan.paths_label(),
            "attacks": [p.label for p in self.plan.attacks],
            "plan": [p.record() for p in self.plan.attacks],
            "shift": self.shift.identity(),
            "cost_level": self.plan.cost_level().value,
            "eot_samples": self.eot,
            "eval_draws": self.draws,
            "stochastic": self.defense.stochastic,
            "notes": self.notes,
            **({"reference_defense": self.identity["reference_defense"]["config"]} if self.reference_defense is not None else {}),
        }


# --------------------------------------------------------------------------- overrides
def parse_set(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``["k=v", ...]`` -> ``(("k", "v"), ...)``; a missing ``=`` is a one-line error."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise HarnessError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return tuple(out)


@dataclass
class Overrides:
    """``--set`` pairs routed to their owners."""

    threat: dict[str, Any] = field(default_factory=dict)
    defense: dict[str, str] = field(default_factory=dict)
    attack_options: list[str] = field(default_factory=list)
    shift_options: list[str] = field(default_factory=list)

    def threat_values(self) -> dict[str, Any]:
        """Threat-spec overrides, with the routed option lists."""
        out = dict(self.threat)
        if self.attack_options:
            out["attack_options"] = tuple(self.attack_options)
        if self.shift_options:
            out["shift_options"] = tuple(self.shift_options)
        return out


def split_overrides(
    overrides: tuple[tuple[str, str], ...], defense_cls: type[Defense], default_shift: str = "none"
) -> Overrides:
    """Route ``--set key=value`` pairs to the threat spec, the defense, an attack or the shift.

    ``threat.key``, ``defense.key``, ``shift.key`` and ``ATTACK.key`` are explicit; a bare
    key goes wherever it exists among the spec, the defense config and the shift's
    config (an ambiguous bare key is an error, an unknown one suggests the closest).
    """
    threat_keys = set(spec_fields())
    defense_keys = set(config_fields(defense_cls.Config))
    out = Overrides()
    bare: list[tuple[str, str]] = []
    for key, value in overrides:
        owner, _, rest = key.partition(".")
        if rest and owner == "threat":
            out.threat[rest] = value
        elif rest and owner == "defense":
            out.defense[rest] = value
        elif rest and owner == "shift":
            out.shift_options.append(f"{rest}={value}")
        elif rest and owner in ATTACKS:
            out.attack_options.append(f"{key}={value}")
        elif rest:
            raise HarnessError(
                f"--set {key}: '{owner}' is not threat, defense, shift or a registered attack{suggest(owner, ATTACKS.names())}"
            )
        else:
            bare.append((key, value))
    shift_name = out.threat.get("shift", dict(bare).get("shift", default_shift))
    shift_keys = set(config_fields(SHIFTS.get(shift_name).Config)) if shift_name in SHIFTS else set()
    for key, value in bare:
        owners = [name for name, keys in (("threat", threat_keys), ("defense", defense_keys), ("shift", shift_keys)) if key in keys]
        if len(owners) > 1:
            raise HarnessError(f"--set {key} is an option of {' and '.join(owners)}; write " + " or ".join(f"{o}.{key}" for o in owners))
        if owners == ["threat"]:
            out.threat[key] = value
        elif owners == ["defense"]:
            out.defense[key] = value
        elif owners == ["shift"]:
            out.shift_options.append(f"{key}={value}")
        else:
            known = sorted(threat_keys | defense_keys | shift_keys)
            raise HarnessError(
                f"--set {key}: unknown option{suggest(key, known)} (threat: {', '.join(sorted(threat_keys))}; "
                f"defense '{defense_cls.name}': {', '.join(sorted(defense_keys)) or 'none'}; attack options: ATTACK.KEY)"
            )
    return out


# --------------------------------------------------------------------------- resolution
def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise HarnessError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise HarnessError(f"device '{name}' is not supported (use cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device '{name}' requested but CUDA is not available on this machine")
    return dev


def _default_n(defense_cls: type[Defense], plan: AttackPlan, info: Any) -> tuple[int | None, str | None]:
    """A costly cell's subset size from the defense's ``default_examples`` (by cost level)."""
    order = ["classifier", "purifier-forward", "purifier-gradient"]
    level = plan.cost_level().value
    caps = [n for lvl, n in defense_cls.default_examples.items() if lvl in order and order.index(lvl) <= order.index(level)]
    if not caps or min(caps) >= info.default_n:
        return None, None
    n = min(caps)
    return n, (
        f"n_examples {n}: '{defense_cls.name}' subsamples cells whose attack costs '{level}' by default "
        f"(the dataset default is {info.default_n}; --n-examples to change)"
    )


def _effective_notes(defense: Defense, spec: ThreatSpec, job_eot: int, draws: int) -> list[str]:
    notes = []
    if job_eot != spec.eot_samples:
        notes.append(f"eot_samples {spec.eot_samples} -> 1: the attacked model is deterministic")
    if draws != spec.eval_draws:
        notes.append(f"eval_draws {spec.eval_draws} -> 1: defense '{defense.name}' is deterministic")
    if spec.detect and not defense.has_detection_score:
        notes.append(f"detect=true ignored: defense '{defense.name}' declares no detection score")
    return notes


def _setup_defense(defense: Defense, cfg: RunConfig, info: Any, clf: Any, device: torch.device) -> None:
    ctx = SetupContext(
        classifier=clf.module, dataset=cfg.dataset, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
        device=device, weights_dir=Path(cfg.weights_dir) if cfg.weights_dir else None,
    )
    defense.setup(ctx)
    defense.to(device).eval()
    for p in defense.parameters():
        p.requires_grad_(False)


def _reference_defense(
    defense_cls: type[Defense], defense: Defense, values: dict, cfg: RunConfig, info, clf, device
) -> Defense | None:
    """For ``paired_reference``: the defense trained on the evaluated dataset when the job's was
    trained on another one (a defense config field ``trained_on``, filled in at setup); else None.
    """
    trained_on = getattr(defense.config, "trained_on", None)
    if trained_on is None or trained_on == cfg.dataset:
        return None
    ref = defense_cls.from_dict({**values, "trained_on": cfg.dataset})
    _setup_defense(ref, cfg, info, clf, device)
    return ref


#: While :func:`sharing_networks` is active: key -> the classifier or set-up defense already built for it.
_SHARED: dict[str, Any] | None = None


@contextmanager
def sharing_networks():
    """Within this block, :func:`resolve` builds each classifier and each set-up defense once and hands the same
    object to every job that asks for the same one (same name, configuration, dataset, weights and device).

    A grid's parent resolves every cell to plan the grid and keeps the jobs for bookkeeping; without sharing,
    each cell would load (and hold) its own copy of every network: 117 of each for the smoke grid, and for a
    paper grid one score model per cell. The parent never runs these jobs (workers resolve their own), and the
    dry run's calibration only evaluates them, so sharing changes no number. Not for code that trains or
    otherwise changes a network.
    """
    global _SHARED
    prev, _SHARED = _SHARED, {}
    try:
        yield
    finally:
        _SHARED = prev


def _shared(kind: str, key: Any, build):
    """``build()``, or inside :func:`sharing_networks` the object an identical earlier request built."""
    if _SHARED is None:
        return build()
    k = kind + ":" + dumps(canonical(key))
    if k not in _SHARED:
        _SHARED[k] = build()  # a failure (e.g. a missing checkpoint) stores nothing: the next cell raises it too
    return _SHARED[k]


def _protocol(cfg: RunConfig):
    """What a job's configuration says without any file: the classes, the routed overrides, spec, plan and shift."""
    from harness import data as D
    from harness.core.plugins import load_builtin, load_plugin

    load_builtin()
    for p in cfg.plugins:
        load_plugin(p)
    defense_cls = DEFENSES.get(cfg.defense)
    threat_model = THREATS.get(cfg.threat)
    info = D.DATASETS.get(cfg.dataset)
    routed = split_overrides(cfg.overrides, defense_cls, threat_model.base.get("shift", "none"))
    spec = threat_model.resolve(info.family, routed.threat_values())
    spec.check_eps_for(int(np.prod(info.image_shape)))
    plan = build_plan(defense_cls, spec)
    shift = SHIFTS.get(spec.shift).from_options(spec.options_for_shift())
    reason = shift.check(tuple(info.image_shape))
    if reason:
        raise IncompatibleError(f"shift '{shift.name}' cannot run on dataset '{cfg.dataset}': {reason}")
    return defense_cls, info, routed, spec, plan, shift


#: Defense options that name a file (``model_path``, ``weights``): dropped where they name nothing on this machine.
_FILE_OPTIONS = ("model_path", "weights")


def _without_files(defense_cls: type[Defense], values: dict[str, str]) -> Defense:
    """The defense built from ``values`` minus the file options that name files not on this machine."""
    try:
        return defense_cls.from_dict(values)
    except MissingFileError:
        kept = {k: v for k, v in values.items() if k not in _FILE_OPTIONS or Path(str(v)).expanduser().exists()}
        return defense_cls.from_dict(kept)


def plan_without_files(cfg: RunConfig) -> ResolvedJob:
    """A stand-in job for a cell whose files are missing here: the real spec, plan, shift and defense configuration
    (with its per-dataset defaults), no data, classifier or weights. Its network evaluations
    (:func:`harness.evaluation.cost.estimate_nfe`) are the job's; it has no identity and cannot run.

    Raises:
        HarnessError: the configuration itself is wrong (what :func:`resolve` would raise first).
    """
    from types import SimpleNamespace

    defense_cls, info, routed, spec, plan, shift = _protocol(cfg)
    defense = _without_files(defense_cls, routed.defense)
    resolve_defaults = getattr(defense, "_resolve_for", None)  # the diffusion purifiers' per-dataset defaults (setup's)
    if resolve_defaults is not None:
        resolve_defaults(cfg.dataset)
    n = cfg.n_examples or _default_n(defense_cls, plan, info)[0] or info.default_n
    trained_on = getattr(defense.config, "trained_on", None)
    ref = defense if spec.paired_reference and trained_on not in (None, cfg.dataset) else None
    draws = spec.eval_draws if defense.stochastic else 1
    return ResolvedJob(
        cfg=cfg, subset=SimpleNamespace(y=range(n)), dataset_info=info, classifier=None, defense=defense, spec=spec,
        plan=plan, shift=shift, draws=draws, identity={}, job_id="", reference_defense=ref,
    )


def resolve(cfg: RunConfig) -> ResolvedJob:
    """Load and validate everything a job needs; raise HarnessError on bad input."""
    from harness import classifiers as C
    from harness import data as D

    defense_cls, info, routed, spec, plan, shift = _protocol(cfg)
    device = _device(cfg.device)
    defense_values = routed.defense
    fresh = defense_cls.from_dict(defense_values)  # a bad value fails here, before any data or network is loaded

    n_examples, n_note = cfg.n_examples, None
    if n_examples is None:
        n_examples, n_note = _default_n(defense_cls, plan, info)
    subset = D.eval_subset(cfg.dataset, n_examples, cfg.data_seed, cfg.data_dir)
    clf_name = cfg.classifier or C.default_classifier(cfg.dataset)
    clf_key = [clf_name, cfg.dataset, cfg.weights, cfg.model_dir, str(device)]
    clf = _shared("classifier", clf_key, lambda: C.load_classifier(
        clf_name, dataset=cfg.dataset, weights=cfg.weights, model_dir=cfg.model_dir, device=device))
    setup_key = [cfg.dataset, clf_key, str(device), cfg.weights_dir, list(cfg.plugins)]

    def set_up():
        _setup_defense(fresh, cfg, info, clf, device)
        return fresh

    config_key = [defense_cls.name, dataclasses.asdict(fresh.config), setup_key]  # canonical values: 0.1 == "0.10"
    defense = _shared("defense", config_key, set_up)  # an identical earlier one, set up, while sharing
    ref_defense = None
    if spec.paired_reference:
        ref_defense = _shared("reference", config_key,
                              lambda: _reference_defense(defense_cls, defense, defense_values, cfg, info, clf, device))

    draws = spec.eval_draws if defense.stochastic else 1
    job_eot = spec.eot_samples if (defense.stochastic and plan.main_path is not GradientPath.CLASSIFIER) else 1
    notes = ([n_note] if n_note else []) + list(defense.setup_notes) + _effective_notes(defense, spec, job_eot, draws)
    notes += list(plan.notes)
    if spec.paired_reference:
        ref = f"'{defense.name}' trained on '{cfg.dataset}'" if ref_defense is not None else "the same defense"
        notes.append(f"paired reference: {ref} on the unshifted inputs, and the undefended classifier, on the same examples "
                     "with the same attack seeds")
    identity = {
        "defense": defense.identity(),
        "threat": spec.to_dict(),
        "plan": [p.record() for p in plan.attacks],
        "shift": shift.identity(),
        "effective": {
            "gradient_path": plan.main_path.value, "also_paths": [p.value for p in plan.also_paths],
            "eot_samples": job_eot, "eval_draws": draws,
        },
        "dataset": subset.identity,
        "classifier": clf.identity,
        "seed": cfg.seed,
        "packages": package_versions(),
    }
    if ref_defense is not None:
        identity["reference_defense"] = ref_defense.identity()
    identity = canonical(identity)
    job_id = hashlib.sha256(dumps(identity).encode()).hexdigest()
    return ResolvedJob(
        cfg=cfg, subset=subset, dataset_info=info, classifier=clf, defense=defense, spec=spec, plan=plan, shift=shift,
        draws=draws, identity=identity, job_id=job_id, device=device, notes=notes, reference_defense=ref_defense,
    )
