"""FlowPure (Collaert et al. 2025, arXiv 2505.13280): purification with a conditional flow.

A continuous normalizing flow ``dx/dt = v_theta(t, x)`` trained by conditional flow
matching (``harness train flowpure``, :mod:`harness.training.flowpure`) carries a source
image at t = 0 (adversarial or noisy) to its clean image at t = 1 (spec 2.3; the
torchcfm convention x0 = source, x1 = clean). Three registered variants:

- ``flowpure-pgd``, ``flowpure-cw``: trained on PGD-linf / CW-l2 sources crafted against
  the victim classifier; deterministic: x(0) = x, 9 Euler steps on linspace(0, 1, 10).
- ``flowpure-gauss``: trained on x + sigma_max N(0, I) with sigma_max = 0.3; stochastic:
  inject sigma <= sigma_max (config ``sigma``, default 0.15 = ``gauss_flowpure_0.15``),
  start at t_start = 1 - sigma / sigma_max from x(t_start) = x + sigma * eps, and take 9
  Euler steps on linspace(t_start, 1, 10).

The velocity network is a time-conditioned ``diffusers.UNet2DModel`` working directly on
[0, 1] images (no centring, as in the official code); the flow time t in [0, 1] enters
the UNet's sinusoidal embedding as ``t * time_scale`` (``time_scale`` = 1000 for the
shipped models, read from the weights' json recipe), so the embedding sees the range a
DDPM UNet is built for. The integration uses ``torchdiffeq.odeint(method="euler")`` on the
given grid.

Deviation from the official code: the final state is clamped to [0, 1] (the harness
contract requires [0, 1] outputs; the official code feeds the unclamped state to the
classifier). Every gradient path differentiates through the clamp.

Weights: ``harness/weights/flowpure-<variant>-<dataset>.pt`` (a state_dict) with the
``.json`` recipe beside it (architecture, time scale, victim classifier, sha256, training
curve, accuracies). ``--weights-dir DIR`` is searched first and ``--set weights=FILE.pt``
overrides both. The sha256 of the loaded file is written into the config
(``weights_sha256``) at setup, so it enters the job identity. FlowPure's training pairs
are crafted against one victim classifier (the recipe's ``classifier``); evaluating the
purifier in front of another classifier is a transfer setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from harness.core.config import build_from_recipe, read_recipe
from harness.core.env import WEIGHTS_DIR, sha256_file
from harness.core.registry import HarnessError, MissingFileError
from harness.core.registry import first_line as _first_line
from harness.core.defense import Defense, DefenseConfig, GradientPath, SetupContext, randn_like, register_defense
from defenses._transfer import AdapterMode, TransferMixin, adapter_field, trained_on_field

#: Noise level of the Gaussian training sources (official ``SIGMA = 3``, divided by 10).
SIGMA_MAX = 0.3
#: Variants, in the order ``harness train flowpure --variant`` lists them.
VARIANTS = ("pgd", "cw", "gauss")


def shipped_weights_dir() -> Path:
    """``harness/weights`` (where the digits flows ship)."""
    return WEIGHTS_DIR


def weights_name(variant: str, dataset: str) -> str:
    """File stem of the weights of one variant and dataset, e.g. ``flowpure-pgd-digits``."""
    return f"flowpure-{variant}-{dataset}"


def train_command(variant: str, dataset: str) -> str:
    """The command that trains FlowPure weights of ``variant`` on ``dataset`` (for error messages)."""
    return f"harness train flowpure --variant {variant} --dataset {dataset}"



# --------------------------------------------------------------------------- network
def build_unet(unet_config: dict[str, Any], where: str = "unet_config") -> nn.Module:
    """A ``diffusers.UNet2DModel`` from its keyword arguments (as recorded in a recipe); one-line error otherwise."""
    from diffusers import UNet2DModel

    return build_from_recipe(UNet2DModel, unet_config, where)


class VelocityField(nn.Module):
    """``v_theta(t, x)`` in torchdiffeq's ``func(t, y)`` convention (an nn.Module, so it also serves the adjoint).

    Args:
        unet: a ``UNet2DModel`` (or any ``net(x, timesteps)`` returning a tensor or an
            object with ``.sample``).
        time_scale: the UNet sees ``t * time_scale``.

    Shape:
        t: scalar or (B,) flow time in [0, 1]; x: (B, C, H, W) in (about) [0, 1]; out: like x.
    """

    def __init__(self, unet: nn.Module, time_scale: float = 1000.0):
        super().__init__()
        self.unet = unet
        self.time_scale = float(time_scale)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        timesteps = (t * self.time_scale).reshape(-1).expand(x.shape[0])
        out = self.unet(x, timesteps)
        return getattr(out, "sample", out)


def load_velocity(path: Path, expect_sha256: str | None = None) -> tuple[VelocityField, dict[str, Any], dict[str, Any]]:
    """Load ``<name>.pt`` built from the ``unet_config`` of ``<name>.json`` beside it.

    The recipe's sha256 must match the file (a swapped or truncated checkpoint fails
    instead of silently changing every number), and so must ``expect_sha256`` if given.

    Returns:
        ``(field, source, recipe)``; ``source`` = file name, sha256 and variant.

    Raises:
        HarnessError: missing recipe, sha256 mismatch, unreadable or ill-fitting weights.
    """
    recipe_path = path.with_suffix(".json")
    if not recipe_path.is_file():
        raise HarnessError(f"FlowPure weights '{path}' have no recipe '{recipe_path.name}' beside them (it holds the architecture)")
    recipe = read_recipe(recipe_path, "FlowPure")
    try:
        time_scale = float(recipe["time_scale"])
    except (KeyError, TypeError, ValueError):
        raise HarnessError(f"FlowPure recipe '{recipe_path}' lacks a numeric time_scale") from None
    digest = sha256_file(path)
    if recipe.get("sha256") and recipe["sha256"] != digest:
        raise HarnessError(
            f"FlowPure weights '{path}' have sha256 {digest[:12]}..., their recipe says {str(recipe['sha256'])[:12]}..."
        )
    if expect_sha256 and expect_sha256 != digest:
        raise HarnessError(f"FlowPure weights '{path}' have sha256 {digest[:12]}..., weights_sha256 asks for {expect_sha256[:12]}...")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types; report one line
        raise HarnessError(f"cannot load FlowPure weights '{path}': {_first_line(exc)}") from None
    unet = build_unet(recipe.get("unet_config"), f"FlowPure recipe '{recipe_path}': unet_config")
    try:
        unet.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise HarnessError(f"FlowPure weights '{path.name}' do not fit their recipe's UNet: {_first_line(exc)}") from None
    source = {"file": path.name, "sha256": digest, "variant": recipe.get("variant")}
    return VelocityField(unet, time_scale), source, recipe


def find_weights(variant: str, dataset: str, weights: str | None, weights_dir: Path | None) -> Path:
    """The weights file: ``weights`` if given, else ``weights_dir`` then the shipped folder.

    Raises:
        HarnessError: one line naming the file and the command that trains it.
    """
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise MissingFileError(f"FlowPure weights file '{p}' does not exist")
        return p
    name = weights_name(variant, dataset) + ".pt"
    folders = ([Path(weights_dir)] if weights_dir else []) + [shipped_weights_dir()]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    where = " or ".join(str(f) for f in folders)
    raise MissingFileError(
        f"FlowPure weights '{name}' for dataset '{dataset}' not found in {where}: "
        f"train them with `{train_command(variant, dataset)}` or pass --set weights=FILE.pt"
    )


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class FlowPureConfig(DefenseConfig):
    """Options of the deterministic variants (``flowpure-pgd``, ``flowpure-cw``)."""

    steps: int = field(default=9, metadata={"help": "Euler steps at defense time, on linspace(t0, 1, steps + 1) (paper: 9)"})
    surrogate_steps: int = field(default=4, metadata={"help": "Euler steps of the 'surrogate' gradient path (DiffHammer: 4)"})
    adjoint_method: Literal["euler", "midpoint", "rk4"] = field(
        default="euler",
        metadata={
            "help": "solver of the adjoint ODE on the 'adjoint' path (euler: the forward's; midpoint/rk4: closer to the exact gradient)"
        },
    )
    weights: str | None = field(
        default=None, metadata={"help": "a .pt with its .json recipe beside it; default flowpure-<variant>-<dataset>.pt"}
    )
    weights_sha256: str | None = field(
        default=None, metadata={"help": "sha256 the weights must have; filled in at setup, so it enters the job identity"}
    )
    trained_on: str | None = trained_on_field()
    adapter: AdapterMode = adapter_field()

    def __post_init__(self):
        for key in ("steps", "surrogate_steps"):
            if getattr(self, key) < 1:
                raise HarnessError(f"flowpure: {key}={getattr(self, key)} is out of range (must be >= 1)")


@dataclass(frozen=True)
class GaussFlowPureConfig(FlowPureConfig):
    """Options of ``flowpure-gauss``: the deterministic ones plus the injected noise."""

    sigma: float | None = field(
        default=None,
        metadata={
            "help": f"injected noise std, 0 < sigma <= sigma_max = {SIGMA_MAX}; t_start = 1 - sigma/sigma_max "
            "(0.15 = gauss_flowpure_0.15); None = the dataset's default (0.15; cifar10: 0.1)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sigma is not None and not 0 < self.sigma <= SIGMA_MAX:
            raise HarnessError(f"flowpure-gauss: sigma={self.sigma} is out of range (0 < sigma <= {SIGMA_MAX})")


# --------------------------------------------------------------------------- defenses
class FlowPureBase(TransferMixin, Defense):
    """Shared machinery of the three variants: weights, the Euler flow, gradient paths, detection.

    Gradient paths:
        ``full``: autograd through the ``steps`` Euler steps (exact; ``steps`` NFE forward
        plus their backward). ``adjoint``: ``torchdiffeq.odeint_adjoint`` on the same grid
        and method; the adjoint ODE is solved by one backward step per interval of
        ``adjoint_method`` (default euler, whose vector-Jacobian products sit at the
        interval's end, one grid point later than the exact discrete gradient's), so the
        gradient is exact only up to solver error (on the shipped digits flow its cosine
        with ``full`` is about 0.99; midpoint about 0.997); no parameter gradients are
        accumulated. ``surrogate``: autograd through ``surrogate_steps`` Euler steps on
        linspace(t0, 1, surrogate_steps + 1) (DiffHammer's 4-step twin). ``bpda``: identity.
    """

    variant: ClassVar[str] = ""
    version = "1"
    Config = FlowPureConfig
    stochastic = False
    gradient_paths = frozenset({GradientPath.BPDA, GradientPath.FULL, GradientPath.ADJOINT, GradientPath.SURROGATE})
    has_detection_score = True
    nfe_per_call = 9

    def __init__(self, config: DefenseConfig | None = None):
        super().__init__(config)
        self.velocity: VelocityField | None = None
        self.weights_source: dict[str, Any] | None = None
        self.recipe: dict[str, Any] | None = None
        self.nfe_per_call = self.config.steps

    # -- weights
    def use_velocity(self, net: nn.Module, time_scale: float = 1000.0) -> "FlowPureBase":
        """Bind a velocity UNet directly (tests, notebooks); :meth:`setup` then keeps it."""
        vfield = net if isinstance(net, VelocityField) else VelocityField(net, time_scale)
        vfield.eval()
        for p in vfield.parameters():
            p.requires_grad_(False)
        self.velocity = vfield
        return self

    def setup(self, ctx: SetupContext) -> None:
        inner = None
        if self.velocity is None:
            path = find_weights(self.variant, self.training_dataset(ctx), self.config.weights, ctx.weights_dir)
            vfield, source, recipe = load_velocity(path, self.config.weights_sha256)
            if recipe.get("variant") not in (None, self.variant):
                raise HarnessError(
                    f"FlowPure weights '{path.name}' were trained for variant '{recipe['variant']}'; "
                    f"defense '{self.name}' needs '{self.variant}' weights"
                )
            cfg = recipe["unet_config"]
            inner = (cfg.get("in_channels"), cfg.get("sample_size"), cfg.get("sample_size"))
            self.use_velocity(vfield)
            self.weights_source, self.recipe = source, recipe
            # The file's digest becomes part of the config, hence of the job identity.
            self.config = dataclasses.replace(self.config, weights_sha256=source["sha256"])
        self.bind_transfer(ctx, inner)
        self.to(ctx.device)

    def _field(self) -> VelocityField:
        if self.velocity is None:
            raise HarnessError(f"defense '{self.name}' has no velocity network: call setup(ctx) first (or use_velocity)")
        return self.velocity

    # -- the flow
    def start(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        """The initial state and time ``(x(t0), t0)``: ``(x, 0)`` for the deterministic variants."""
        return x, 0.0

    def _grid(self, t0: float, steps: int, x: torch.Tensor) -> torch.Tensor:
        return torch.linspace(t0, 1.0, steps + 1, dtype=x.dtype, device=x.device)

    def _flow(self, x: torch.Tensor, generator: torch.Generator | None, steps: int, adjoint: bool = False) -> torch.Tensor:
        import torchdiffeq

        x0, t0 = self.start(self.adapt_in(x), generator)
        grid = self._grid(t0, steps, x0)
        if adjoint:
            # adjoint_params=(): the attacker needs d/dx only, never the weights' gradient.
            traj = torchdiffeq.odeint_adjoint(
                self._field(), x0, grid, method="euler", adjoint_method=self.config.adjoint_method, adjoint_params=()
            )
        else:
            traj = torchdiffeq.odeint(self._field(), x0, grid, method="euler")
        # Deviation: the official code does not clamp; the harness contract needs [0, 1].
        return self.adapt_out(traj[-1].clamp(0.0, 1.0))

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._flow(x, generator, self.config.steps)

    def purify_adjoint(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._flow(x, generator, self.config.steps, adjoint=True)

    def purify_surrogate(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._flow(x, generator, self.config.surrogate_steps)

    def detection_score(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example l2 norm of the initial velocity ``v(t0, x(t0))`` (higher = more likely adversarial)."""
        x0, t0 = self.start(self.adapt_in(x), generator)
        return self._field()(torch.tensor(t0, dtype=x0.dtype, device=x0.device), x0).flatten(1).norm(dim=1)


@register_defense("flowpure-pgd")
class FlowPurePGD(FlowPureBase):
    """FlowPure trained on PGD-linf sources (deterministic; Collaert et al. 2025, arXiv 2505.13280).

    ``x(0) = x``; 9 Euler steps of the learned velocity on linspace(0, 1, 10); output
    clamped to [0, 1]. No randomness. NFE 9. Gradient paths: full, adjoint, surrogate, bpda.

    Shape:
        x: (N, C, H, W) float32 in [0, 1] -> same.

    Example:
        ``harness run --defense flowpure-pgd --threat adaptive``
    """

    variant = "pgd"


@register_defense("flowpure-cw")
class FlowPureCW(FlowPureBase):
    """FlowPure trained on CW-l2 sources (deterministic; otherwise as ``flowpure-pgd``).

    Shape:
        x: (N, C, H, W) float32 in [0, 1] -> same.
    """

    variant = "cw"


@register_defense("flowpure-gauss")
class FlowPureGauss(FlowPureBase):
    """FlowPure trained on Gaussian sources x + 0.3 N(0, I) (stochastic).

    ``t_start = 1 - sigma / 0.3``; ``x(t_start) = x + sigma * eps`` with eps drawn from the
    generator; 9 Euler steps on linspace(t_start, 1, 10); output clamped to [0, 1]. The
    surrogate path draws its own noise the same way. NFE 9.

    Shape:
        x: (N, C, H, W) float32 in [0, 1] -> same.

    Example:
        ``harness run --defense flowpure-gauss --threat adaptive --set sigma=0.2``
    """

    variant = "gauss"
    Config = GaussFlowPureConfig
    stochastic = True
    #: the paper's gauss_flowpure_0.15 (CIFAR-10 and -100 in the paper)
    DEFAULT_SIGMA: ClassVar[float] = 0.15
    #: per-dataset injected noise: the shipped CPU-trained CIFAR-10 flow (a 1 M-parameter UNet) loses most of its
    #: clean accuracy to the noise at 0.15 (worst of 10 draws); 0.1 is the paper's lower end (docs/cifar10.md: the sweep)
    SIGMA_DATASET_DEFAULTS: ClassVar[dict[str, float]] = {"cifar10": 0.1}

    def setup(self, ctx: SetupContext) -> None:
        if self.config.sigma is None:
            sigma = self.SIGMA_DATASET_DEFAULTS.get(ctx.dataset, self.DEFAULT_SIGMA)
            self.config = dataclasses.replace(self.config, sigma=sigma)  # the value used enters the identity
            if sigma != self.DEFAULT_SIGMA:
                self.setup_notes = [f"flowpure-gauss: sigma={sigma} (dataset default for '{ctx.dataset}'; paper value "
                                    f"{self.DEFAULT_SIGMA})"]
        super().setup(ctx)

    @property
    def sigma(self) -> float:
        """The injected noise std (the dataset's default once set up; the paper's 0.15 before)."""
        return self.DEFAULT_SIGMA if self.config.sigma is None else self.config.sigma

    def t_start(self) -> float:
        return 1.0 - self.sigma / SIGMA_MAX

    def start(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        """``x(t_start) = t_start x + (1 - t_start)(x + sigma_max eps) = x + sigma eps`` (not clipped)."""
        return x + self.sigma * randn_like(x, generator), self.t_start()
