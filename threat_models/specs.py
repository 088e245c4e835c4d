"""Threat models as versioned data.

A :class:`ThreatSpec` is a frozen record of everything that defines an attack protocol:
norm and budget, attacks, steps and step size, restarts, EOT samples per gradient,
evaluation draws per example, the scoring rule and the gradient path. A
:class:`ThreatModel` is a named template that resolves to a spec for a dataset (CIFAR
budgets differ from those of the 8x8 digits) with user overrides applied
(``--set eps=0.05``). The resolved spec, not the template, enters the job identity.

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

from harness.registry import HarnessError, Registry, suggest
from harness.types import GradientPath, build_config, config_to_dict, parse_gradient_path

#: Attack names a spec may list. ``autoattack-rand`` = APGD-CE + APGD-DLR with EOT;
#: ``autoattack-standard`` = APGD-CE, APGD-T, FAB-T, Square (deterministic defenses).
ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "autoattack-rand", "autoattack-standard")


@dataclass(frozen=True)
class ThreatSpec:
    """A fully resolved attack protocol. Every field changes the number it produces."""

    name: str = field(metadata={"help": "threat model name"})
    version: str = field(default="1", metadata={"help": "bumped whenever the protocol changes"})
    norm: Literal["linf", "l2"] = field(default="linf", metadata={"help": "perturbation norm"})
    eps: float = field(default=8 / 255, metadata={"help": "budget in the [0,1] pixel domain"})
    attacks: tuple[str, ...] = field(default=("pgd",), metadata={"help": f"attacks, per-example minimum ({', '.join(ATTACKS)})"})
    steps: int = field(default=10, metadata={"help": "PGD iterations"})
    step_size: float = field(default=2 / 255, metadata={"help": "PGD step size (sign step for linf, normalised for l2)"})
    restarts: int = field(default=1, metadata={"help": "PGD restarts; the best per example is kept"})
    random_start: bool = field(default=True, metadata={"help": "PGD starts uniformly inside the ball"})
    loss: Literal["ce", "cw", "dlr"] = field(default="ce", metadata={"help": "PGD loss"})
    apgd_steps: int = field(default=100, metadata={"help": "iterations of each APGD attack (AutoAttack)"})
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
        metadata={"help": "most images in one defended forward pass (EOT samples and draws are stacked up to it; lower it to fit GPU memory)"},
    )
    detect: bool = field(default=False, metadata={"help": "store the detection ROC-AUC for defenses with a detection score"})

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise HarnessError(f"threat '{self.name}': norm must be linf or l2, got {self.norm!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)) or self.eps <= 0:
            raise HarnessError(f"threat '{self.name}': eps={self.eps} is out of range (must be > 0)")
        if self.norm == "linf" and self.eps > 1:
            raise HarnessError(f"threat '{self.name}': eps={self.eps} is out of range for linf on [0,1] images (0 < eps <= 1)")
        for a in self.attacks:
            if a not in ATTACKS:
                raise HarnessError(f"threat '{self.name}': unknown attack '{a}'{suggest(a, list(ATTACKS))}")
        for p in self.also_paths:
            parse_gradient_path(p)
            if p in ("classifier", "auto"):
                raise HarnessError(f"threat '{self.name}': also_paths takes defended paths (bpda, full, adjoint, surrogate), got '{p}'")
        if not self.attacks:
            raise HarnessError(f"threat '{self.name}': needs at least one attack")
        for k in ("steps", "restarts", "eot_samples", "eval_draws", "batch_size", "apgd_steps", "max_forward"):
            if getattr(self, k) < (0 if k == "steps" else 1):
                raise HarnessError(f"threat '{self.name}': {k}={getattr(self, k)} is out of range")
        if self.step_size <= 0 or not math.isfinite(self.step_size):
            raise HarnessError(f"threat '{self.name}': step_size={self.step_size} is out of range (must be > 0)")
        if self.gradient_path != "auto":
            parse_gradient_path(self.gradient_path)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @property
    def attacks_defense(self) -> bool:
        """True if the attacker differentiates through (or around) the purifier."""
        return self.gradient_path != GradientPath.CLASSIFIER.value

    def check_eps_for(self, image_numel: int) -> None:
        """An l2 budget larger than the diameter of [0,1]^D is meaningless."""
        if self.norm == "l2" and self.eps > math.sqrt(image_numel):
            raise HarnessError(
                f"threat '{self.name}': l2 eps={self.eps} is out of range for {image_numel}-pixel images (max {math.sqrt(image_numel):.3g})"
            )


@dataclass(frozen=True)
class ThreatModel:
    """A named protocol template; :meth:`resolve` gives the spec for one dataset."""

    name: str
    description: str
    base: dict[str, Any]
    #: dataset family ("cifar", "digits", "mnist") -> field overrides (budgets, scaled steps)
    per_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: l2 budgets per family, used when a user asks for norm=l2 without an eps
    l2_eps: dict[str, float] = field(default_factory=dict)

    def resolve(self, family: str, overrides: dict[str, Any] | None = None) -> ThreatSpec:
        values = dict(self.base)
        values.update(self.per_family.get(family, {}))
        overrides = dict(overrides or {})
        if overrides.get("norm") == "l2" and "eps" not in overrides:
            values["eps"] = self.l2_eps.get(family, 0.5)
            values["step_size"] = values["eps"] / 4
        if "eps" in overrides and "step_size" not in overrides and "norm" not in overrides:
            # keep the template's step/eps ratio when only the budget changes
            old_eps = float(values.get("eps", 8 / 255))
            new_eps = build_config(ThreatSpec, {"name": self.name, "eps": overrides["eps"]}, owner=f"threat '{self.name}'").eps
            values["step_size"] = float(values.get("step_size", 2 / 255)) * new_eps / old_eps
        values.update(overrides)
        values["name"] = self.name
        return build_config(ThreatSpec, values, owner=f"threat '{self.name}'")


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
_L2 = {"cifar": 0.5, "digits": 1.0, "mnist": 2.0}


def _family(extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in _CPU_FAMILIES.items()}
    for fam, vals in extra.items():
        out.setdefault(fam, {}).update(vals)
    return out


THREATS.register(
    "preprocessor-blind",
    ThreatModel(
        name="preprocessor-blind",
        description="PGD on the classifier alone (the attacker ignores the purifier); then purify and classify R times",
        base=dict(
            attacks=("pgd",), steps=10, step_size=2 / 255, random_start=True, gradient_path="classifier",
            eot_samples=1, eval_draws=10, scoring="worst",
        ),
        per_family=_family({"digits": {"steps": 20}, "mnist": {"steps": 20}}),
        l2_eps=_L2,
    ),
)

THREATS.register(
    "bpda",
    ThreatModel(
        name="bpda",
        description="BPDA+EOT (DiffPure/Hill et al.): purify forward, identity backward, logits averaged over EOT samples",
        base=dict(
            attacks=("pgd",), steps=50, step_size=2 / 255, random_start=False, gradient_path="bpda",
            eot_samples=15, eot_reduce="logits", eval_draws=10, scoring="worst",
        ),
        per_family=_family({"digits": {"steps": 20, "eot_samples": 4}, "mnist": {"steps": 20, "eot_samples": 4}}),
        l2_eps=_L2,
    ),
)

THREATS.register(
    "adaptive",
    ThreatModel(
        name="adaptive",
        description="fully adaptive white-box: PGD-EOT and AutoAttack-rand (APGD-CE, APGD-DLR) through the exact gradient, then again "
        "through BPDA on the examples that survive; per-example minimum",
        base=dict(
            attacks=("pgd", "autoattack-rand"), steps=200, step_size=0.007, random_start=False, gradient_path="auto",
            also_paths=("bpda",), eot_samples=20, apgd_steps=100, eval_draws=10, scoring="worst",
        ),
        per_family=_family(
            {
                "digits": {"steps": 40, "eot_samples": 4, "apgd_steps": 40},
                "mnist": {"steps": 40, "eot_samples": 4, "apgd_steps": 40},
            }
        ),
        l2_eps=_L2,
    ),
)


def spec_fields() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(ThreatSpec) if f.name != "name"}
