"""DiffPure (Nie et al., ICML 2022, arXiv 2205.07460): the diffusion-purification baseline.

Two registered variants share a noise-prediction UNet (:mod:`defenses._diffusion`):

- ``diffpure``: the official VP-SDE version (spec 2.1). Forward-diffuse the input to t*
  in one shot with the discrete alpha_bar, then integrate the reverse VP-SDE from t* to
  1e-5 with Euler-Maruyama (dt = 1e-3: 100 steps at t* = 0.1), score
  -eps(x, 999 t)/sqrt(1 - alpha_bar(t)) with the continuous alpha_bar.
- ``diffpure-ddpm``: the ancestral DDPM sampler used by Lee & Kim (ICCV 2023,
  arXiv 2303.09051), FlowPure and DiffHammer (spec 2.1b), with a configurable maximum
  timestep and number of denoising steps (a *count*, Lee & Kim's convention; FlowPure's
  "stride" s corresponds to ``denoising_steps = max_timestep / s``).

Per-dataset defaults (used when the option is not set; the effective values enter the
job identity and ``setup_notes``): the papers' CIFAR-10 values everywhere, except on the
embedded 8x8 ``digits``, where the adaptive threat (PGD-40 and APGD-CE/DLR-40, EOT 4,
then the same through BPDA on the survivors; 64 examples by ``default_examples``) must
finish on a 2-core CPU within minutes (98 s measured). There both variants take **5 solver steps** (``diffpure``: t* = 0.1 with
dt = 0.02; ``diffpure-ddpm``: 5 DDPM steps at max_timestep 100, the step count of
FlowPure/DiffHammer's attack surrogate), ``surrogate_steps`` = 2 and no gradient
checkpointing (a whole 5-step trajectory of 8x8 images is a few MB; recomputing each
step would cost a third more per gradient). t* = 0.1 keeps the paper's noise level.
Measured with the shipped digits backbone and ``digits-cnn`` on 200 test images (mean
of 3 draws; l_inf 0.2): with 5 / 10 / 100 Euler-Maruyama steps (dt 0.02 / 0.01 / 0.001)
clean accuracy is 97.0 / 97.2 / 96.8%, after preprocessor-blind PGD-10 58.5 / 61.2 /
59.8%, after full-gradient PGD-10 with EOT 2 50.3 / 49.2 / 53.0%: the coarse solver
defends as the fine one at 1/2 and 1/20 of the cost. ``--set dt=0.01`` (or 0.001) buys
the finer discretisation. Elsewhere checkpointing is on, so memory stays flat in the
number of steps. Note that the stochastic adjoint integrates the continuous adjoint SDE
with the same coarse step, so at 5 steps its gradient is far from the exact one (the
``full`` path, which "auto" picks, is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from defenses._diffusion import (
    BACKBONE_HELP,
    MODEL_PATH_HELP,
    T_END,
    Backbone,
    DDPMSampler,
    DiffusionDefense,
    ReverseVPSDE,
    ddpm_sequence,
    discrete_alpha_bar,
    draw_noise,
    integrate_adjoint,
    integrate_em,
    integrate_steps,
    sde_steps,
    timestep_index,
)
from defenses._transfer import AdapterMode, adapter_field, trained_on_field
from harness.core.registry import HarnessError
from harness.core.defense import DefenseConfig, GradientPath, randn_like, register_defense

_DATASET_HELP = "; None = the dataset's default"


@dataclass(frozen=True)
class DiffPureConfig(DefenseConfig):
    """Options of ``diffpure`` (None = the dataset's default, resolved at setup)."""

    t_star: float | None = field(
        default=None, metadata={"help": "diffusion time t* (0.1 = DiffPure CIFAR-10 linf, 0.075 l2)" + _DATASET_HELP}
    )
    dt: float | None = field(default=None, metadata={"help": "Euler-Maruyama step (1e-3 official: 100 steps at t*=0.1)" + _DATASET_HELP})
    surrogate_steps: int | None = field(default=None, metadata={"help": "solver steps of the 'surrogate' gradient path" + _DATASET_HELP})
    t_end: float = field(default=T_END, metadata={"help": "where the reverse SDE stops"})
    checkpoint: bool | None = field(
        default=None,
        metadata={
            "help": "checkpointing on the 'full' path (per step; sqrt(N) segments from 32 steps): memory flat in the steps" + _DATASET_HELP
        },
    )
    model_path: str | None = field(default=None, metadata={"help": MODEL_PATH_HELP})
    backbone: Backbone = field(default="unet2d", metadata={"help": BACKBONE_HELP})
    trained_on: str | None = trained_on_field()
    adapter: AdapterMode = adapter_field()

    def __post_init__(self):
        if self.t_star is not None:
            timestep_index(self.t_star)
            sde_steps(self.t_star, 1.0, self.t_end)
        if self.dt is not None and not (self.dt > 0 and math.isfinite(self.dt)):
            raise HarnessError(f"diffpure: dt={self.dt} is out of range (must be > 0)")
        if self.surrogate_steps is not None and self.surrogate_steps < 1:
            raise HarnessError(f"diffpure: surrogate_steps={self.surrogate_steps} is out of range (must be >= 1)")
        if not 0 < self.t_end < 0.01:
            raise HarnessError(f"diffpure: t_end={self.t_end} is out of range (0 < t_end < 0.01)")


@register_defense("diffpure")
class DiffPure(DiffusionDefense):
    """DiffPure, official VP-SDE version (Nie et al. 2022, arXiv 2205.07460).

    ``x~ = 2x - 1``; ``x_t* = sqrt(a[n*-1]) x~ + sqrt(1 - a[n*-1]) e`` (discrete alpha_bar,
    n* = 1000 t*); reverse VP-SDE by Euler-Maruyama from t* to ``t_end``; output
    ``clamp((x_0 + 1)/2, 0, 1)`` (the official code does not clamp; the contract needs [0,1]).

    Randomness: the forward-noising e, then one standard normal per solver step, all
    drawn in that order from the ``generator`` given to :meth:`purify`; the same
    generator state gives the same purification on every gradient path.

    Gradient paths and their cost (N = ceil((t* - t_end)/dt) steps, NFE = N per call):

    - ``full``: autograd through the N Euler-Maruyama steps with the noise fixed;
      with ``checkpoint`` each step is recomputed in the backward pass (about 4N UNet
      forward-equivalents, activation memory of one step); from
      ``_diffusion.TWO_LEVEL_FROM`` (32) steps in ceil(sqrt(N)) segments that keep only
      their first state, so the kept states do not grow with N either (about 5N).
    - ``adjoint``: ``torchsde.sdeint_adjoint`` (Euler forward, Milstein adjoint) on the
      same Brownian increments; flat memory, about 3-4N forward-equivalents.
    - ``surrogate``: ``full`` through a twin with ``surrogate_steps`` steps over the same
      interval (its own, fewer, noise draws).
    - ``bpda``: identity backward.

    Shape:
        x: (B, C, H, W) float32 in [0, 1] -> same shape, in [0, 1].

    Example:
        >>> d = DiffPure.from_dict({"t_star": 0.1})
        >>> d.setup(ctx)                                     # loads the dataset's UNet
        >>> x_pur = d.purify(x, generator=torch.Generator().manual_seed(0))
    """

    version = "1"
    Config = DiffPureConfig
    gradient_paths = frozenset({GradientPath.BPDA, GradientPath.FULL, GradientPath.ADJOINT, GradientPath.SURROGATE})
    DEFAULTS = {"t_star": 0.1, "dt": 1e-3, "surrogate_steps": 10, "checkpoint": True}
    DATASET_DEFAULTS = {
        **{ds: {"t_star": 0.1, "dt": 0.02, "surrogate_steps": 2, "checkpoint": False} for ds in ("digits", "mnist5k")},
        # CIFAR-10 on a CPU with the shipped cifar10-ddpm: 10 Euler-Maruyama steps (dt 0.01) instead of 100, a 2-step
        # surrogate; checkpointing stays on (a 10-step trajectory of a batch of 32x32 images is several GB)
        "cifar10": {"t_star": 0.1, "dt": 0.01, "surrogate_steps": 2, "checkpoint": True},
        # ImageNet (guided-diffusion): DiffPure's t* for l_inf 4/255
        **{ds: {"t_star": 0.15} for ds in ("imagenet", "imagenet-rb5000")},
    }

    def _count_nfe(self, cfg) -> int:
        return sde_steps(cfg.t_star, cfg.dt, cfg.t_end)

    def _diffuse(self, x: torch.Tensor, cfg, generator: torch.Generator | None) -> torch.Tensor:
        x_t = 2.0 * x - 1.0
        a = discrete_alpha_bar()[timestep_index(cfg.t_star) - 1].item()
        return math.sqrt(a) * x_t + math.sqrt(1.0 - a) * randn_like(x_t, generator)

    def _purify(self, x: torch.Tensor, generator: torch.Generator | None, *, steps: int | None, adjoint: bool) -> torch.Tensor:
        cfg = self.effective_config()
        n = steps if steps is not None else sde_steps(cfg.t_star, cfg.dt, cfg.t_end)
        x = self.adapt_in(x)
        xs = self._diffuse(x, cfg, generator)
        sde = ReverseVPSDE(self._net(), tuple(x.shape[1:]), cfg.t_star, n, cfg.t_end)
        noise = draw_noise(xs, n, generator)
        x0 = integrate_adjoint(sde, xs, noise) if adjoint else integrate_em(sde, xs, noise, checkpoint=cfg.checkpoint)
        return self.adapt_out(((x0 + 1.0) * 0.5).clamp(0.0, 1.0))

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, steps=None, adjoint=False)

    def purify_adjoint(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, steps=None, adjoint=True)

    def purify_surrogate(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, steps=self.effective_config().surrogate_steps, adjoint=False)


# --------------------------------------------------------------------------- DDPM variant
@dataclass(frozen=True)
class DiffPureDDPMConfig(DefenseConfig):
    """Options of ``diffpure-ddpm`` (None = the dataset's default, resolved at setup)."""

    max_timestep: int | None = field(default=None, metadata={"help": "t* in DDPM steps (100 = t* 0.1)" + _DATASET_HELP})
    denoising_steps: int | None = field(default=None, metadata={"help": "denoising steps (a count, Lee & Kim convention)" + _DATASET_HELP})
    surrogate_steps: int | None = field(default=None, metadata={"help": "denoising steps of the 'surrogate' gradient path" + _DATASET_HELP})
    eta: float = field(default=1.0, metadata={"help": "1 = DDPM (ancestral), 0 = DDIM (deterministic after the forward noise)"})
    checkpoint: bool | None = field(
        default=None,
        metadata={
            "help": "checkpointing on the 'full' path (per step; sqrt(N) segments from 32 steps): memory flat in the steps" + _DATASET_HELP
        },
    )
    model_path: str | None = field(default=None, metadata={"help": MODEL_PATH_HELP})
    backbone: Backbone = field(default="unet2d", metadata={"help": BACKBONE_HELP})
    trained_on: str | None = trained_on_field()
    adapter: AdapterMode = adapter_field()

    def __post_init__(self):
        if self.max_timestep is not None and not 1 <= self.max_timestep <= 1000:
            raise HarnessError(f"diffpure-ddpm: max_timestep={self.max_timestep} is out of range (1..1000)")
        for k in ("denoising_steps", "surrogate_steps"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise HarnessError(f"diffpure-ddpm: {k}={v} is out of range (must be >= 1)")
            if v is not None and self.max_timestep is not None and v > self.max_timestep:
                raise HarnessError(f"diffpure-ddpm: {k}={v} exceeds max_timestep={self.max_timestep}")
        if not 0.0 <= self.eta <= 1.0:
            raise HarnessError(f"diffpure-ddpm: eta={self.eta} is out of range (0..1)")


@register_defense("diffpure-ddpm")
class DiffPureDDPM(DiffusionDefense):
    """DiffPure with the ancestral DDPM sampler (spec 2.1b; Lee & Kim, arXiv 2303.09051).

    ``x~ = 2x - 1``; ``x_T = sqrt(a_T) x~ + sqrt(1 - a_T) e`` with T = max_timestep - 1;
    then ``denoising_steps`` DDPM updates over Lee & Kim's sequence
    ``[k - 1 for k in range(stride, max_t + 1, stride)]`` (stride = max_t // denoising_steps);
    output ``clamp((x_0 + 1)/2, 0, 1)``.

    Randomness: e, then one standard normal per denoising step (also the last, whose
    coefficient is 0, as in the reference code), in that order from ``generator``.

    Gradient paths (NFE = ``denoising_steps`` per call):

    - ``full``: autograd through every denoising step with the noise fixed,
      checkpointed per step (about 4 x denoising_steps UNet forward-equivalents; in
      ceil(sqrt(N)) segments from 32 steps, as ``diffpure``).
    - ``surrogate``: the same through ``surrogate_steps`` denoising steps from the same
      max_timestep (Lee & Kim's attack surrogate, FlowPure's ``ATT_DENOISING_STEPS``).
    - ``bpda``: identity backward.

    Shape:
        x: (B, C, H, W) float32 in [0, 1] -> same shape, in [0, 1].
    """

    version = "1"
    Config = DiffPureDDPMConfig
    gradient_paths = frozenset({GradientPath.BPDA, GradientPath.FULL, GradientPath.SURROGATE})
    DEFAULTS = {"max_timestep": 100, "denoising_steps": 10, "surrogate_steps": 5, "checkpoint": True}
    DATASET_DEFAULTS = {
        **{ds: {"denoising_steps": 5, "surrogate_steps": 2, "checkpoint": False} for ds in ("digits", "mnist5k")},
        # ImageNet (guided-diffusion): DiffPure's t* = 0.15 for l_inf 4/255
        **{ds: {"max_timestep": 150} for ds in ("imagenet", "imagenet-rb5000")},
    }

    def _count_nfe(self, cfg) -> int:
        return cfg.denoising_steps

    def _purify(self, x: torch.Tensor, generator: torch.Generator | None, steps: int) -> torch.Tensor:
        cfg = self.effective_config()
        seq = ddpm_sequence(cfg.max_timestep, steps)
        a = discrete_alpha_bar()[cfg.max_timestep - 1].item()
        x_t = 2.0 * self.adapt_in(x) - 1.0
        xs = math.sqrt(a) * x_t + math.sqrt(1.0 - a) * randn_like(x_t, generator)
        sampler = DDPMSampler(self._net(), seq, cfg.eta)
        noise = draw_noise(xs, len(seq), generator)
        x0 = integrate_steps(sampler, xs, noise, checkpoint=cfg.checkpoint)
        return self.adapt_out(((x0 + 1.0) * 0.5).clamp(0.0, 1.0))

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, self.effective_config().denoising_steps)

    def purify_surrogate(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, self.effective_config().surrogate_steps)
