"""The defense contract: what every purification defense declares and implements.

A defense is an ``nn.Module`` subclass of :class:`Defense`, registered by name in
:data:`DEFENSES`. It maps float32 NCHW images in [0, 1] to images in [0, 1]
(``purify``) and declares its capabilities as class attributes, so the engine never
special-cases a defense by name:

- ``stochastic``: whether two purifications of the same input differ. Stochastic
  defenses draw all their randomness from the ``torch.Generator`` they are given, get
  EOT gradients, and are scored from several independent purifications per example.
- ``gradient_paths``: which ways an attacker may differentiate through the purifier
  (:class:`GradientPath`). ``classifier`` (ignore the purifier) and ``bpda`` (identity
  backward) are available for every defense; ``full`` is autograd through
  :meth:`Defense.purify` and must be declared (a purifier that rounds, compresses or
  runs a test-time optimisation declares only ``bpda``); ``adjoint`` and ``surrogate``
  come from overriding :meth:`Defense.purify_adjoint` and :meth:`Defense.purify_surrogate`.
- ``requires``: what the defense needs at :meth:`Defense.setup` (e.g. ``{"classifier"}``
  for classifier-guided purification such as COUP).
- ``provides``: capabilities an attack may require (e.g. ``{"latent_generator"}`` for
  CMAP's consistency-disruption attack); an attack that needs one the defense lacks is
  refused with the reason.
- ``has_detection_score``: whether :meth:`Defense.detection_score` gives an
  adversarial-example detector (FlowPure's initial velocity magnitude).
- ``default_examples``: evaluation-subset sizes for costly cells, keyed by the cost of
  the attack (:class:`CostLevel`), never by a threat's name.
- ``nfe_per_call``: network evaluations of the generative model per purified image (0
  for a defense without one; an instance attribute where the config sets it, e.g. a
  solver's step count). The run records purifications x ``nfe_per_call``, and
  ``--dry-run`` predicts it (:mod:`harness.evaluation.cost`).

Scoring never needs gradients: evaluation draws call :meth:`Defense.classify` with
``path=None`` (the defense's own forward) under ``torch.no_grad``. A defense whose
decision is not ``classifier(purify(x))`` (CMAP votes over N purifications internally)
overrides :meth:`Defense.classify`.

Each defense keeps its options in a frozen dataclass ``Config``; unknown keys are an
error. The job identity holds the name, version, config and a hash of the defense's
source files, so editing a defense never reuses a stale stored result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from harness.core.config import build_config, plugin_identity
from harness.core.registry import HarnessError, Registry, class_registrar, suggest


class GradientPath(str, enum.Enum):
    """How an attacker obtains d(loss)/d(input) through a purifier."""

    CLASSIFIER = "classifier"  # the purifier is ignored by the attacker (preprocessor-blind)
    BPDA = "bpda"  # purify on the forward pass, identity on the backward pass
    FULL = "full"  # exact autograd through the whole purifier (checkpointed where needed)
    ADJOINT = "adjoint"  # exact up to solver error, via an adjoint ODE/SDE
    SURROGATE = "surrogate"  # autograd through a cheaper twin of the purifier (approximate)

    def __str__(self) -> str:  # so f-strings and JSON show "full", not "GradientPath.FULL"
        return self.value


#: Preference order when a threat model asks for the strongest available path ("auto").
STRONGEST_FIRST = (GradientPath.FULL, GradientPath.ADJOINT, GradientPath.SURROGATE, GradientPath.BPDA)


class CostLevel(str, enum.Enum):
    """How much of the purifier an attack pays for per step (what ``default_examples`` keys on)."""

    CLASSIFIER = "classifier"  # the attack never runs the purifier (only the evaluation draws do)
    FORWARD = "purifier-forward"  # every attack step purifies (BPDA, gradient-free attacks on the defense)
    GRADIENT = "purifier-gradient"  # every attack step differentiates through the purifier

    def __str__(self) -> str:
        return self.value


def parse_gradient_path(value: str | GradientPath) -> GradientPath:
    """A :class:`GradientPath` from its name; unknown names are a one-line error."""
    if isinstance(value, GradientPath):
        return value
    try:
        return GradientPath(value)
    except ValueError:
        names = [p.value for p in GradientPath]
        raise HarnessError(
            f"unknown gradient path '{value}'{suggest(str(value), names)} (choose from {', '.join(names)})"
        ) from None


@dataclass(frozen=True)
class DefenseConfig:
    """Base of every defense's config; subclasses add typed fields with defaults."""


@dataclass
class SetupContext:
    """What a defense may use at setup time. Nothing here is global state.

    Attributes:
        classifier: the defended classifier ([0,1] input, normalisation inside), in eval mode.
        dataset: registry name of the dataset being evaluated.
        image_shape: (C, H, W).
        num_classes: number of classes.
        device: where tensors live.
        weights_dir: a folder the user gave for checkpoints (``--weights-dir``), or None.
    """

    classifier: nn.Module | None
    dataset: str
    image_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weights_dir: Path | None = None


class _BPDA(torch.autograd.Function):
    """Forward: the purified tensor (computed without graph). Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, purified: torch.Tensor) -> torch.Tensor:
        return purified.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None


def bpda(x: torch.Tensor, purified: torch.Tensor) -> torch.Tensor:
    """Return ``purified`` on the forward pass with d/dx = identity on the backward pass."""
    return _BPDA.apply(x, purified.detach())


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on its own device.

    Drawing on the generator's device and moving keeps results identical whether the
    generator is a CPU or a CUDA one, as long as the same generator is passed.
    """
    gdev = generator.device if generator is not None else x.device
    z = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype)
    return z.to(x.device)


#: Purified values may leave [0, 1] by this much (float rounding) before it is an error.
RANGE_TOLERANCE = 1e-5


class Defense(nn.Module):
    """Base class of every purification defense. See the module docstring for the contract.

    Subclasses set ``name`` (via registration), ``Config``, the capability flags, and
    implement :meth:`purify`. Tensors are float32 NCHW in [0, 1].
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = DefenseConfig
    stochastic: ClassVar[bool] = False
    gradient_paths: ClassVar[frozenset[GradientPath]] = frozenset({GradientPath.BPDA, GradientPath.FULL})
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    has_detection_score: ClassVar[bool] = False
    #: True for a defense whose purifier is the identity (the undefended baseline): the
    #: classifier is then the whole model, so an attack on it alone is fully adaptive.
    identity_purifier: ClassVar[bool] = False
    #: cost level (:class:`CostLevel` value) -> evaluation-subset size used when the user
    #: gives none: costly cells are subsampled (spec section 6: 64-128 images for
    #: diffusion purifiers under adaptive attacks). The run prints it and the subset
    #: enters the job identity.
    default_examples: ClassVar[dict[str, int]] = {}
    #: Further paths a threat that asks for the strongest path (``gradient_path=auto``)
    #: also attacks through, before the threat's own ``also_paths``: for defenses whose
    #: exact gradient is costly or weak (CMAP adds its one-step surrogate).
    also_attack_through: ClassVar[tuple[GradientPath, ...]] = ()
    #: Network evaluations of the generative model per purified image (per purification call
    #: of a batch; see the module docstring). Every shipped defense declares it.
    nfe_per_call: int = 0
    #: Lines :meth:`setup` sets to say what it chose that the user did not (per-dataset
    #: defaults scaled for a CPU, tiling, ...). Every run prints them and stores them with
    #: the job, so nothing is silent.
    setup_notes: list[str]

    def __init__(self, config: DefenseConfig | None = None):
        super().__init__()
        self.setup_notes = []
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise HarnessError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(self.config).__name__}")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None) -> "Defense":
        """Build with a config from plain values (strings from ``--set`` are coerced)."""
        return cls(build_config(cls.Config, values or {}, owner=f"defense '{cls.name}'"))

    def setup(self, ctx: SetupContext) -> None:
        """Load weights, bind the classifier if ``requires`` asks for it. Default: nothing."""

    # ----------------------------------------------------------------- purification
    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Map images in [0,1] to purified images in [0,1]; autograd through it is ``full``."""
        raise NotImplementedError(f"{type(self).__name__} must implement purify()")

    def purify_adjoint(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Purification whose backward pass uses an adjoint solver (override to support)."""
        raise HarnessError(f"defense '{self.name}' has no adjoint gradient path")

    def purify_surrogate(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A cheaper differentiable twin of :meth:`purify` (override to support)."""
        raise HarnessError(f"defense '{self.name}' has no surrogate gradient path")

    def purify_along(
        self, x: torch.Tensor, path: GradientPath | str | None, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Purify ``x`` so that gradients flow along ``path`` (forward values are the purifier's).

        ``path=None`` is the defense's own forward without autograd (what scoring uses).
        Every output is checked against the [0, 1] contract.
        """
        if path is None:
            with torch.no_grad():
                return self.check_range(self.purify(x.detach(), generator=generator))
        path = parse_gradient_path(path)
        if path is GradientPath.CLASSIFIER:
            return x
        if path not in self.supported_paths():
            have = ", ".join(sorted(p.value for p in self.supported_paths()))
            raise HarnessError(f"defense '{self.name}' has no '{path.value}' gradient path (supports: {have})")
        if path is GradientPath.BPDA:
            with torch.no_grad():
                out = self.check_range(self.purify(x.detach(), generator=generator))
            return bpda(x, out)
        if path is GradientPath.FULL:
            out = self.purify(x, generator=generator)
        elif path is GradientPath.ADJOINT:
            out = self.purify_adjoint(x, generator=generator)
        else:
            out = self.purify_surrogate(x, generator=generator)
        return self.check_range(out)

    def check_range(self, out: torch.Tensor) -> torch.Tensor:
        """Return ``out`` if it is inside [0, 1] (the contract); otherwise a one-line error."""
        lo, hi = torch.aminmax(out.detach())
        lo, hi = float(lo), float(hi)
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise HarnessError(
                f"defense '{self.name}' returned values in [{lo:.4g}, {hi:.4g}], outside [0, 1] "
                "(the purifier contract; clamp its output)"
            )
        return out

    def classify(
        self,
        x: torch.Tensor,
        classifier: nn.Module,
        *,
        path: GradientPath | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits of the defended model (``path=None``: the defense's own forward, no autograd).

        Override for defenses with internal voting.
        """
        return classifier(self.purify_along(x, path, generator=generator))

    def detection_score(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example score, higher = more likely adversarial (when ``has_detection_score``)."""
        raise HarnessError(f"defense '{self.name}' declares no detection score")

    # ----------------------------------------------------------------- capabilities
    @classmethod
    def supported_paths(cls) -> frozenset[GradientPath]:
        """The declared gradient paths plus the two every defense has (classifier, bpda)."""
        return frozenset(cls.gradient_paths) | {GradientPath.CLASSIFIER, GradientPath.BPDA}

    @classmethod
    def strongest_path(cls) -> GradientPath:
        """The first of full, adjoint, surrogate, bpda that the defense supports."""
        have = cls.supported_paths()
        return next(p for p in STRONGEST_FIRST if p in have)

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """Declared capabilities, for ``harness ls`` and the job record."""
        return {
            "stochastic": cls.stochastic,
            "gradient_paths": sorted(p.value for p in cls.supported_paths()),
            "requires": sorted(cls.requires),
            "provides": sorted(cls.provides),
            "has_detection_score": cls.has_detection_score,
            "version": cls.version,
        }

    def identity(self) -> dict[str, Any]:
        """What of this defense enters a job's identity hash (name, version, config, source)."""
        return plugin_identity(self, Defense)


DEFENSES: Registry[type[Defense]] = Registry("defense")


def _check_defense(name: str, cls: type) -> None:
    levels = {c.value for c in CostLevel}
    bad = sorted(set(cls.default_examples) - levels)
    if bad:
        raise HarnessError(f"defense '{name}': default_examples keys {bad} are not cost levels ({', '.join(sorted(levels))})")


register_defense = class_registrar(DEFENSES, Defense, "defense", _check_defense)
