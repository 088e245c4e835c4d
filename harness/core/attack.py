"""The attack contract: what every attack declares and implements.

An attack is a subclass of :class:`Attack`, registered by name in :data:`ATTACKS`
(``@register_attack("pgd")``), one module per attack under ``threat_models/attacks/``
or in a ``--plugin`` file. The engine builds one instance per job from the resolved
threat spec (its generic knobs: ``steps``, ``step_size``, ``restarts``,
``random_start``, ``loss``, ``apgd_steps``) and the attack's own ``Config`` (set with
``--set <attack>.<field>=value``), and calls :meth:`Attack.run` with one signature::

    attack.run(model, x, y, budget, rng, progress) -> AttackResult

- ``model``: the defended forward (:class:`AttackedModel`): [0,1] images -> logits
  along the gradient path the plan chose; a stochastic one draws fresh purification
  noise on every call and offers ``model.eot(...)``, the EOT-averaged logits and
  gradient with the spec's sample count stacked along the batch.
- ``x``, ``y``: clean inputs (float32 NCHW in [0, 1]) and labels.
- ``budget``: :class:`Budget` (the norm's geometry and eps, a float or per example).
- ``rng``: :class:`AttackRandomness` (a generator for the attack's own sampling and
  an integer seed for libraries that seed torch's global generator).
- ``progress(k)``: report k ticks done (the attack's cost is :meth:`Attack.ticks`).

It returns the adversarial examples (inside the eps-ball and [0, 1]), the per-example
margin ``max_{j != y} z_j - z_y`` of the model's (EOT-averaged) logits on them (> 0:
the attack believes the example is broken) and, where the attack has iterations, the
robust count after each one (non-increasing: it is of the best iterate so far).

Capabilities are declared, so the engine never special-cases an attack by name:
``norms`` (the norms it supports), ``needs_gradients``, ``eot`` (how it treats a
stochastic model: ``batched`` EOT samples stacked along the batch, ``looped`` by its
library, or ``none``: it refuses stochastic models), ``requires`` (defense
capabilities it needs, e.g. ``latent_generator``) and ``minimum_norm`` (it looks for
the smallest perturbation, so it need not use the whole budget).

Attack suites (:class:`AttackSuite`, e.g. AutoAttack) are named compositions of
registered attacks; a suite may choose its members by whether the attacked model is
stochastic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Protocol

import torch

from harness.core.config import build_config, plugin_identity
from harness.core.registry import HarnessError, Registry, class_registrar

EOTMode = Literal["batched", "looped", "none"]


@dataclass(frozen=True)
class AttackConfig:
    """Base of every attack's own options (``--set <attack>.<field>=value``)."""


@dataclass
class AttackResult:
    """What an attack returns for a batch."""

    x_adv: torch.Tensor  # (B, C, H, W) inside the eps-ball and [0, 1]
    margin: torch.Tensor  # (B,) margin of the model's logits at x_adv (> 0: broken by the attack's estimate)
    curve: list[int] = field(default_factory=list)  # robust count after each iteration (0 = start); [] if none
    #: per-example statistics of the attack's own (B,) in [0, 1], stored with the batch and aggregated into the
    #: metrics ``robust_accuracy_<label>_<name>`` (DiffHammer: ``any_iterate``, ``avg``); {} if none
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """The perturbation budget: a registered norm and eps (a float or a per-example (B,) tensor)."""

    norm: str
    eps: Any

    @property
    def geometry(self):
        """The registered :class:`threat_models.norms.Norm` (projection, distance, steps)."""
        from threat_models.norms import NORMS

        return NORMS.get(self.norm)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_adv`` projected onto the budget's ball around ``x`` and [0, 1]."""
        return self.geometry.project(x_adv, x, self.eps)

    def scalar_eps(self) -> float:
        """Eps as one float (libraries take one budget per call)."""
        if isinstance(self.eps, torch.Tensor):
            if self.eps.numel() and not bool((self.eps == self.eps.flatten()[0]).all()):
                raise HarnessError("this attack takes one budget per batch, not per-example budgets")
            return float(self.eps.flatten()[0])
        return float(self.eps)


@dataclass
class AttackRandomness:
    """Randomness an attack may use: a generator for its own sampling (random starts) and
    a seed for libraries that draw from torch's global generator (run them inside
    ``torch.random.fork_rng`` seeded with it, so the global stream is left untouched).
    """

    generator: torch.Generator | None
    seed: int


class AttackedModel(Protocol):
    """The defended forward an attack differentiates through (see harness.evaluation.forward).

    Attacks that require a defense capability (``requires``) reach the defense, the
    classifier and the path's generator as ``model.defense``, ``model.classifier`` and
    ``model.generator``.
    """

    stochastic: bool
    eot_samples: int
    eot_reduce: str
    max_forward: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def eot(
        self, x: torch.Tensor, y: torch.Tensor, *, loss: str, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


class Attack:
    """Base class of every attack. See the module docstring for the contract."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = AttackConfig
    description: ClassVar[str] = ""
    norms: ClassVar[frozenset[str]] = frozenset({"linf", "l2"})
    needs_gradients: ClassVar[bool] = True
    eot: ClassVar[EOTMode] = "batched"
    requires: ClassVar[frozenset[str]] = frozenset()
    minimum_norm: ClassVar[bool] = False
    #: What one step costs when that is not what its gradient path says (an attack that
    #: differentiates through a defense's own generator declares ``CostLevel.GRADIENT``).
    cost_level: ClassVar[Any] = None
    #: False for attacks that do not differentiate along the job's gradient path (they use a
    #: defense capability instead, or no gradient): the plan does not repeat them on ``also_paths``.
    uses_path: ClassVar[bool] = True

    def __init__(self, spec: Any, config: AttackConfig | None = None):
        self.spec = spec
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise HarnessError(f"attack '{self.name}' expects a {self.Config.__name__}, got {type(self.config).__name__}")

    @classmethod
    def from_options(cls, spec: Any, options: dict[str, Any] | None = None) -> "Attack":
        """Build from the resolved threat spec and plain option values (coerced, checked)."""
        return cls(spec, build_config(cls.Config, options or {}, owner=f"attack '{cls.name}'"))

    def ticks(self) -> int:
        """Progress ticks one run costs (iterations, or one tick for a one-shot attack)."""
        return 1

    def model_calls(self, eot: int) -> int:
        """Images through the attacked model per attacked image, for cost estimates (``--dry-run``).

        The default is one EOT-averaged evaluation (``eot`` images) per progress tick:
        exact for PGD (``steps + 1`` evaluations per restart), about right for iterative
        library attacks (APGD's initial evaluation and FAB's extra forward per step are
        not counted). Override where that is far off.
        """
        return self.ticks() * max(1, int(eot))

    def run(
        self,
        model: AttackedModel,
        x: torch.Tensor,
        y: torch.Tensor,
        budget: Budget,
        rng: AttackRandomness,
        progress: Callable[[int], None],
    ) -> AttackResult:
        """Attack one batch; see the module docstring."""
        raise NotImplementedError(f"attack '{self.name}' must implement run()")

    # ----------------------------------------------------------------- records
    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """Declared capabilities, for ``harness ls attacks`` and the job record."""
        return {
            "norms": sorted(cls.norms),
            "needs_gradients": cls.needs_gradients,
            "eot": cls.eot,
            "requires": sorted(cls.requires),
            "minimum_norm": cls.minimum_norm,
            "cost_level": None if cls.cost_level is None else str(cls.cost_level),
            "version": cls.version,
        }

    def identity(self) -> dict[str, Any]:
        """What of this attack enters a job's identity hash (name, version, config, source)."""
        return plugin_identity(self, Attack)


ATTACKS: Registry[type[Attack]] = Registry("attack")


def _check_attack_name(name: str, cls: type) -> None:
    if "@" in name or "." in name:
        raise HarnessError(f"attack name '{name}' may not contain '@' or '.'")
    if name in SUITES:
        raise HarnessError(f"attack '{name}' has the name of a registered attack suite")


register_attack = class_registrar(ATTACKS, Attack, "attack", _check_attack_name)


@dataclass(frozen=True)
class AttackSuite:
    """A named composition of registered attacks (AutoAttack's versions).

    ``deterministic`` lists the members used when the attacked model is deterministic,
    ``stochastic`` those used when it is stochastic (None: the same list).
    """

    name: str
    description: str
    deterministic: tuple[str, ...]
    stochastic: tuple[str, ...] | None = None

    def members(self, stochastic: bool) -> tuple[str, ...]:
        """The attacks this suite runs against a (non-)stochastic model."""
        return self.stochastic if (stochastic and self.stochastic is not None) else self.deterministic


SUITES: Registry[AttackSuite] = Registry("attack suite")


def register_suite(suite: AttackSuite) -> AttackSuite:
    """Register an :class:`AttackSuite` under its name (names are shared with attacks)."""
    if suite.name in ATTACKS:
        raise HarnessError(f"attack suite '{suite.name}' has the name of a registered attack")
    SUITES.register(suite.name, suite)
    return suite

