"""Threat models as versioned data.

A :class:`ThreatSpec` is a frozen record of everything that defines an attack protocol,
in three stages:

1. an optional input **shift** (a registered transform of the clean inputs, labels
   kept, applied before everything else; ``none`` by default);
2. the **attacks** (registered attacks or attack suites, per-example minimum), each
   through a gradient path (``gradient_path``, or ``attack@path``), repeated through
   ``also_paths``, with the generic knobs the attacks read (norm and budget, steps and
   step size, restarts, EOT samples per gradient) and per-attack options
   (``attack_options``: ``"square.n_queries=1000"``);
3. the **scoring** rule over ``eval_draws`` independent purifications per example.

A :class:`ThreatModel` is a named template that resolves to a spec for a dataset
family (CIFAR budgets differ from those of the 8x8 digits) with user overrides applied
(``--set eps=0.05``). The resolved spec, not the template, enters the job identity.
Templates are registered one file each in ``threat_models/threats/``.

Per-dataset defaults follow ``shared/spec/DEFENSES_AND_THREATS.md``: on CIFAR, l_inf
8/255 and l_2 0.5 with the papers' step counts; on the embedded digit datasets an eps at
which the undefended classifier falls below 10% (recorded here) and step counts scaled
to a CPU. Scaled-down values are printed with every run and stored with every job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.core.config import build_config, config_to_dict
from harness.core.defense import parse_gradient_path
from harness.core.registry import HarnessError, Registry, suggest
from threat_models.losses import LOSSES


def canonical_float(v: float) -> float:
    """``v`` rounded to 12 significant digits, so 1/5, 0.2 and 0.05 * 4 are one number."""
    return float(f"{v:.12g}")


def split_attack_entry(entry: str) -> tuple[str, str | None]:
    """``"pgd@bpda"`` -> ``("pgd", "bpda")``; ``"pgd"`` -> ``("pgd", None)``."""
    if "@" in entry:
        name, path = entry.split("@", 1)
        return name, path
    return entry, None


def parse_option(item: str, owner: str) -> tuple[str, str]:
    """``"key=value"`` -> (key, value) with a one-line error otherwise."""
    if "=" not in item:
        raise HarnessError(f"{owner}: option '{item}' must be key=value")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


@dataclass(frozen=True)
class ThreatSpec:
    """A fully resolved attack protocol. Every field changes the number it produces."""

    name: str = field(metadata={"help": "threat model name"})
    version: str = field(default="1", metadata={"help": "bumped whenever the protocol changes"})
    shift: str = field(default="none", metadata={"help": "input shift applied to the clean inputs first (harness ls shifts)"})
    shift_options: tuple[str, ...] = field(
        default=(), metadata={"help": "options of the shift, key=value (--set shift.KEY=V or the bare key)"}
    )
    norm: str = field(default="linf", metadata={"help": "perturbation norm (linf, l2)"})
    eps: float = field(default=8 / 255, metadata={"help": "budget in the [0,1] pixel domain"})
    attacks: tuple[str, ...] = field(
        default=("pgd",),
        metadata={"help": "attacks or suites, per-example minimum; NAME@PATH pins a gradient path (harness ls attacks)"},
    )
    steps: int = field(default=10, metadata={"help": "PGD iterations"})
    step_size: float = field(default=2 / 255, metadata={"help": "PGD step size (sign step for linf, normalised for l2)"})
    restarts: int = field(default=1, metadata={"help": "PGD restarts; the best per example is kept"})
    random_start: bool = field(default=True, metadata={"help": "PGD starts uniformly inside the ball"})
    loss: Literal["ce", "cw", "dlr"] = field(default="ce", metadata={"help": "PGD loss"})
    apgd_steps: int = field(default=100, metadata={"help": "iterations of each APGD / FAB attack (AutoAttack)"})
    attack_options: tuple[str, ...] = field(
        default=(), metadata={"help": "per-attack options, ATTACK.KEY=VALUE (--set ATTACK.KEY=VALUE)"}
    )
    cascade: bool = field(
        default=True,
        metadata={
            "help": "later attacks run only on examples some scoring rule still counts as robust (AutoAttack's cascade; "
            "never changes a number, saves time); false runs every attack on every example"
        },
    )
    gradient_path: str = field(
        default="auto",
        metadata={"help": "classifier | bpda | full | adjoint | surrogate | auto (the defense's strongest)"},
    )
    also_paths: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "further gradient paths every attack also runs through, after the main one (per-example minimum; "
            "with the cascade only on the survivors): the exact gradient is not always the strongest"
        },
    )
    eot_samples: int = field(default=1, metadata={"help": "EOT samples per gradient (stochastic defenses)"})
    eot_reduce: Literal["loss", "logits"] = field(
        default="loss", metadata={"help": "average the loss (standard EOT) or the logits (DiffPure BPDA) over EOT samples"}
    )
    eval_draws: int = field(default=10, metadata={"help": "independent purifications per example at evaluation (R)"})
    scoring: Literal["worst", "majority", "single"] = field(
        default="worst", metadata={"help": "headline rule over the R draws: worst-of-R, majority vote, or single draw"}
    )
    batch_size: int = field(default=128, metadata={"help": "examples per attack batch"})
    max_forward: int = field(
        default=1024,
        metadata={"help": "most images in one defended forward pass (EOT samples and draws are stacked up to it; "
                          "lower it to fit GPU memory)"},
    )
    detect: bool = field(default=False, metadata={"help": "store the detection ROC-AUC for defenses with a detection score"})
    paired_reference: bool = field(
        default=False,
        metadata={
            "help": "also score, on the same examples with the same attack seeds, the reference configuration (the "
            "unshifted inputs; for a defense with trained_on, the purifier trained on the evaluated dataset) and the "
            "undefended classifier on both; stores the paired changes (*_change metrics, Newcombe 95% intervals)"
        },
    )

    def __post_init__(self):
        from harness.core.attack import ATTACKS, SUITES
        from harness.core.shift import SHIFTS
        from threat_models.norms import NORMS

        who = f"threat '{self.name}'"
        if self.norm not in NORMS:
            raise HarnessError(
                f"{who}: unknown norm '{self.norm}'{suggest(self.norm, NORMS.names())} (choose from {', '.join(NORMS.names())})"
            )
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)) or self.eps <= 0:
            raise HarnessError(f"{who}: eps={self.eps} is out of range (must be > 0)")
        if self.norm == "linf" and self.eps > 1:
            raise HarnessError(f"{who}: eps={self.eps} is out of range for linf on [0,1] images (0 < eps <= 1)")
        if not self.attacks:
            raise HarnessError(f"{who}: needs at least one attack")
        names = sorted(set(ATTACKS.names()) | set(SUITES.names()))
        for entry in self.attacks:
            a, path = split_attack_entry(entry)
            if a not in ATTACKS and a not in SUITES:
                raise HarnessError(f"{who}: unknown attack '{a}'{suggest(a, names)} (available: {', '.join(names)})")
            if path is not None:
                parse_gradient_path(path)
        for p in self.also_paths:
            parse_gradient_path(p)
            if p in ("classifier", "auto"):
                raise HarnessError(f"{who}: also_paths takes defended paths (bpda, full, adjoint, surrogate), got '{p}'")
        if self.shift not in SHIFTS:
            raise HarnessError(
                f"{who}: unknown shift '{self.shift}'{suggest(self.shift, SHIFTS.names())} (available: {', '.join(SHIFTS.names())})"
            )
        for k in ("steps", "restarts", "eot_samples", "eval_draws", "batch_size", "apgd_steps", "max_forward"):
            if getattr(self, k) < (0 if k == "steps" else 1):
                raise HarnessError(f"{who}: {k}={getattr(self, k)} is out of range")
        if self.step_size <= 0 or not math.isfinite(self.step_size):
            raise HarnessError(f"{who}: step_size={self.step_size} is out of range (must be > 0)")
        if self.gradient_path != "auto":
            parse_gradient_path(self.gradient_path)
        if self.loss not in LOSSES:
            raise HarnessError(f"{who}: loss must be one of {', '.join(LOSSES)}")
        for item in self.attack_options:
            key, _ = parse_option(item, who)
            if "." not in key or key.split(".", 1)[0] not in ATTACKS:
                raise HarnessError(f"{who}: attack option '{item}' must be ATTACK.KEY=VALUE with a registered attack")
        for item in self.shift_options:
            parse_option(item, who)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the spec's part of the job identity).

        Fields added after stores existed (:data:`_LATER_FIELDS`) are left out at their
        default, so adding them kept every stored job's id.
        """
        out = config_to_dict(self)
        for k, default in _LATER_FIELDS.items():
            if out.get(k) == default:
                out.pop(k)
        return out

    def options_for_attack(self, attack: str) -> dict[str, str]:
        """The ``attack_options`` of one attack, as key -> value (the last setting wins)."""
        out: dict[str, str] = {}
        for item in self.attack_options:
            key, value = parse_option(item, f"threat '{self.name}'")
            owner, k = key.split(".", 1)
            if owner == attack:
                out[k] = value
        return out

    def options_for_shift(self) -> dict[str, str]:
        """The ``shift_options`` as key -> value (the last setting wins)."""
        return dict(parse_option(item, f"threat '{self.name}'") for item in self.shift_options)

    def check_eps_for(self, image_numel: int) -> None:
        """An l2 budget larger than the diameter of [0,1]^D is meaningless."""
        if self.norm == "l2" and self.eps > math.sqrt(image_numel):
            raise HarnessError(
                f"threat '{self.name}': l2 eps={self.eps} is out of range for {image_numel}-pixel images (max {math.sqrt(image_numel):.3g})"
            )


def merge_options(base: tuple[str, ...] | list[str], extra: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Option lists ``key=value`` merged by key, ``extra`` winning, in first-seen order."""
    merged: dict[str, str] = {}
    for item in list(base) + list(extra):
        k, v = parse_option(item, "options")
        merged[k] = v
    return tuple(f"{k}={v}" for k, v in merged.items())


@dataclass(frozen=True)
class ThreatModel:
    """A named protocol template; :meth:`resolve` gives the spec for one dataset family."""

    name: str
    description: str
    base: dict[str, Any]
    #: dataset family ("cifar", "digits", "mnist") -> field overrides (budgets, scaled steps)
    per_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: l2 budgets per family, used when a user asks for norm=l2 without an eps
    l2_eps: dict[str, float] = field(default_factory=dict)

    def resolve(self, family: str, overrides: dict[str, Any] | None = None) -> ThreatSpec:
        """The spec for ``family`` with ``overrides`` (field -> value; option lists merge)."""
        values = dict(self.base)
        for k, v in self.per_family.get(family, {}).items():
            values[k] = merge_options(values.get(k, ()), v) if k in _OPTION_FIELDS else v
        overrides = dict(overrides or {})
        if overrides.get("norm") == "l2" and "eps" not in overrides:
            values["eps"] = self.l2_eps.get(family, 0.5)
            values["step_size"] = values["eps"] / 4
        if "eps" in overrides and "step_size" not in overrides and "norm" not in overrides:
            # keep the template's step/eps ratio when only the budget changes
            old_eps = float(values.get("eps", 8 / 255))
            new_eps = build_config(ThreatSpec, {"name": self.name, "eps": overrides["eps"]}, owner=f"threat '{self.name}'").eps
            values["step_size"] = float(values.get("step_size", 2 / 255)) * new_eps / old_eps
        for k, v in overrides.items():
            if k in _OPTION_FIELDS:
                v = merge_options(values.get(k, ()), [v] if isinstance(v, str) else list(v))
            values[k] = v
        values["name"] = self.name
        spec = build_config(ThreatSpec, values, owner=f"threat '{self.name}'")
        return dataclasses.replace(spec, eps=canonical_float(spec.eps), step_size=canonical_float(spec.step_size))


#: Spec fields added after stores existed, with their defaults (absent from the identity at the default).
_LATER_FIELDS: dict[str, Any] = {"paired_reference": False}

#: Spec fields that hold key=value option lists (merged by key, not replaced).
_OPTION_FIELDS = ("attack_options", "shift_options")

THREATS: Registry[ThreatModel] = Registry("threat")

#: l_inf budgets of the embedded digit datasets, chosen so that the shipped undefended
#: CNN falls below 10% robust accuracy under the preprocessor-blind PGD while the digits
#: stay legible (a purifier has room to help). Measured on the shipped digits-cnn
#: (n=256, 20-step PGD): eps 8/255 -> 95.7%, 0.1 -> 64.5%, 0.15 -> 22.3%, 0.2 -> 1.6%.
#: MNIST uses the customary MNIST budget 0.3. Checked by tests/test_engine.py.
DIGITS_LINF_EPS = 0.2
MNIST_LINF_EPS = 0.3

_CPU_FAMILIES = {
    "digits": {"eps": DIGITS_LINF_EPS, "step_size": DIGITS_LINF_EPS / 4},
    "mnist": {"eps": MNIST_LINF_EPS, "step_size": MNIST_LINF_EPS / 4},
}
#: ImageNet: l_inf 4/255 (DiffPure, Lee & Kim, CMAP; spec section 1), steps of eps/4 (the papers' ImageNet
#: step sizes are not recorded; PGD-EOT's 0.007 would exceed the budget).
IMAGENET_LINF_EPS = 4 / 255
_PAPER_FAMILIES = {"imagenet": {"eps": IMAGENET_LINF_EPS, "step_size": IMAGENET_LINF_EPS / 4}}
#: l_2 budgets per dataset family (CIFAR 0.5 as in the papers; digits and MNIST measured; the papers' ImageNet l_2
#: budget is unrecovered: 3.0, the customary ImageNet l_2 budget of the robustness library, Engstrom et al. 2019).
L2_EPS = {"cifar": 0.5, "digits": 1.0, "mnist": 2.0, "imagenet": 3.0}


def family_defaults(extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The per-family budgets of the embedded datasets and ImageNet, plus a template's own per-family values."""
    out = {k: dict(v) for k, v in {**_CPU_FAMILIES, **_PAPER_FAMILIES}.items()}
    for fam, vals in extra.items():
        out.setdefault(fam, {}).update(vals)
    return out


def register_threat(model: ThreatModel) -> ThreatModel:
    """Register a threat template under its name."""
    THREATS.register(model.name, model)
    return model


def spec_fields() -> dict[str, str]:
    """Spec field -> help text (the threat keys ``--set`` accepts)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(ThreatSpec) if f.name != "name"}
