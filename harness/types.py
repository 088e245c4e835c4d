"""The defense contract: what every purification defense declares and implements.

A defense is an ``nn.Module`` subclass of :class:`Defense`, registered by name in
:data:`DEFENSES`. It maps float32 NCHW images in [0, 1] to images in [0, 1]
(``purify``) and declares its capabilities as class attributes, so the engine never
special-cases a defense by name:

- ``stochastic``: whether two purifications of the same input differ. Stochastic
  defenses draw all their randomness from the ``torch.Generator`` they are given, get
  EOT gradients, and are scored from several independent purifications per example.
- ``gradient_paths``: which ways an attacker may differentiate through the purifier
  (:class:`GradientPath`). ``classifier`` (ignore the purifier) is always available;
  ``bpda`` (identity backward) is provided by this base class for every defense;
  ``full`` is autograd through :meth:`Defense.purify`; ``adjoint`` and ``surrogate``
  are provided by defenses that override :meth:`Defense.purify_adjoint` and
  :meth:`Defense.purify_surrogate`.
- ``requires``: what the defense needs at :meth:`Defense.setup` (e.g. ``{"classifier"}``
  for classifier-guided purification such as COUP).
- ``has_detection_score``: whether :meth:`Defense.detection_score` gives an
  adversarial-example detector (FlowPure's initial velocity magnitude).

A defense whose decision is not ``classifier(purify(x))`` (CMAP votes over N
purifications internally) overrides :meth:`Defense.classify`.

Each defense keeps its options in a frozen dataclass ``Config``; unknown keys are an
error, and ``dataclasses.asdict(defense.config)`` is what enters the job identity.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from harness.registry import HarnessError, Registry, suggest


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


def parse_gradient_path(value: str | GradientPath) -> GradientPath:
    if isinstance(value, GradientPath):
        return value
    try:
        return GradientPath(value)
    except ValueError:
        names = [p.value for p in GradientPath]
        raise HarnessError(f"unknown gradient path '{value}'{suggest(str(value), names)} (choose from {', '.join(names)})") from None


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
    def forward(ctx, x: torch.Tensor, purified: torch.Tensor) -> torch.Tensor:  # noqa: D401
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
    has_detection_score: ClassVar[bool] = False
    #: threat name -> evaluation-subset size used when the user gives none: costly cells
    #: are subsampled (spec section 6: 64-128 images for diffusion purifiers under adaptive
    #: attacks). The run prints it and the subset enters the job identity.
    default_examples: ClassVar[dict[str, int]] = {}
    #: Network evaluations of the generative model per purification call (batch level).
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
        self, x: torch.Tensor, path: GradientPath | str, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Purify ``x`` so that gradients flow along ``path`` (forward values are the purifier's)."""
        path = parse_gradient_path(path)
        if path is GradientPath.CLASSIFIER:
            return x
        if path not in self.supported_paths():
            have = ", ".join(sorted(p.value for p in self.supported_paths()))
            raise HarnessError(f"defense '{self.name}' has no '{path.value}' gradient path (supports: {have})")
        if path is GradientPath.BPDA:
            with torch.no_grad():
                out = self.purify(x.detach(), generator=generator)
            return bpda(x, out)
        if path is GradientPath.FULL:
            return self.purify(x, generator=generator)
        if path is GradientPath.ADJOINT:
            return self.purify_adjoint(x, generator=generator)
        return self.purify_surrogate(x, generator=generator)

    def classify(
        self,
        x: torch.Tensor,
        classifier: nn.Module,
        *,
        path: GradientPath | str = GradientPath.FULL,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits of the defended model. Override for defenses with internal voting."""
        return classifier(self.purify_along(x, path, generator=generator))

    def detection_score(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example score, higher = more likely adversarial (when ``has_detection_score``)."""
        raise HarnessError(f"defense '{self.name}' declares no detection score")

    # ----------------------------------------------------------------- capabilities
    @classmethod
    def supported_paths(cls) -> frozenset[GradientPath]:
        return frozenset(cls.gradient_paths) | {GradientPath.CLASSIFIER, GradientPath.BPDA}

    @classmethod
    def strongest_path(cls) -> GradientPath:
        have = cls.supported_paths()
        return next(p for p in STRONGEST_FIRST if p in have)

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {
            "stochastic": cls.stochastic,
            "gradient_paths": sorted(p.value for p in cls.supported_paths()),
            "requires": sorted(cls.requires),
            "has_detection_score": cls.has_detection_score,
            "version": cls.version,
        }

    def identity(self) -> dict[str, Any]:
        """What of this defense enters a job's identity hash."""
        return {"name": self.name, "version": self.version, "config": config_to_dict(self.config)}


DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(name: str):
    """Class decorator: register a :class:`Defense` subclass under ``name``."""

    def deco(cls: type[Defense]) -> type[Defense]:
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise HarnessError(f"defense '{name}' must subclass harness.types.Defense")
        cls.name = name
        DEFENSES.register(name, cls)
        return cls

    return deco


# --------------------------------------------------------------------------- configs
def config_to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _coerce(value: Any, typ: Any, key: str, owner: str) -> Any:
    """Coerce a CLI string (or JSON value) to the annotated field type."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        v = value
        if isinstance(value, str) and not all(isinstance(c, str) for c in choices):
            v = _coerce(value, type(choices[0]), key, owner)
        if v not in choices:
            raise HarnessError(f"{owner}: {key}={value!r} is not one of {', '.join(map(str, choices))}")
        return v
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key, owner)
    if origin in (tuple, list):
        args = typing.get_args(typ)
        inner = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        return tuple(_coerce(v, inner, key, owner) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            out = float(_eval_fraction(value) if isinstance(value, str) else value)
            if out != out:  # NaN
                raise ValueError(value)
            return out
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise HarnessError(f"{owner}: {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


def _eval_fraction(s: str) -> float:
    """Accept '8/255' style fractions for eps-like values."""
    s = s.strip()
    if "/" in s:
        num, den = s.split("/", 1)
        return float(num) / float(den)
    return float(s)


def build_config(cls: type, values: dict[str, Any], owner: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys are errors, types coerced."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise HarnessError(
                f"{owner} has no option '{key}'{suggest(key, list(fields))} (options: {', '.join(fields) or 'none'})"
            )
        kwargs[key] = _coerce(value, hints[key], key, owner)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"{owner}: {exc}") from None


def config_fields(cls: type) -> dict[str, str]:
    """Field name -> help text, for ``harness ls`` and error messages."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
