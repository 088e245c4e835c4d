"""COUP: Classifier-cOnfidence gUided Purification (Zhang et al., ECAI 2024, arXiv 2408.05900).

A DiffPure variant (spec 2.2) that starts the reverse VP-SDE at the input itself (no
forward noise) and adds to the score the gradient of the defended classifier's
confidence, so purification moves images away from the decision boundary:

    dx = [-beta(t)/2 x - beta(t) (s_theta(x, t) + lambda grad_x log max_y p(y | (x+1)/2))] dt + sqrt(beta(t)) dw

integrated backwards from t* to 1e-5 (Euler-Maruyama, dt = 1e-3, float32, lambda = 1),
then ``clamp(x_0, -1, 1)``. The classifier is the one the job defends; it reaches the
defense through :meth:`COUP.setup` (``ctx.classifier``), never a global.

The official attack (torchsde adjoint) computes the guidance on ``x.detach()``, so its
gradients drop the guidance Jacobian (a second-order classifier term). Here the
``full`` and ``adjoint`` paths include it (double backpropagation, ``create_graph``);
``detach_guidance=true`` reproduces the official behaviour. Report both.

Per-dataset defaults: the paper's values (t* = 0.1, dt = 1e-3, checkpointing on) except
on the embedded ``digits``, where dt = 0.02 (5 steps), ``surrogate_steps`` = 2 and no
checkpointing, as for ``diffpure`` (see :mod:`defenses.diffpure` for the measurements).

Measured on digits (shipped backbone and ``digits-cnn``, l_inf 0.2, worst-of-10 robust
accuracy, the first 64 examples of data seed 0): preprocessor-blind 51.6%; BPDA+EOT
43.8%; PGD-40 + APGD-CE/DLR-40 (EOT 4) through ``full`` alone 48.4%, through ``full``
with ``detach_guidance`` 43.8%. The exact gradient of the guided SDE started at the
input is a weak attack direction here: the guidance pulls inputs back into their class.
The ``adaptive`` threat therefore runs every attack again through BPDA on the survivors
(``also_paths=bpda``), which gives 34.4%, below every single-path attack (186 s on a
2-core CPU). DiffPure under the same default: 1.6% (98 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from defenses._diffusion import (
    BACKBONE_HELP,
    MODEL_PATH_HELP,
    T_END,
    Backbone,
    DiffusionDefense,
    ReverseVPSDE,
    draw_noise,
    integrate_adjoint,
    integrate_em,
    log_max_softmax_grad,
    sde_steps,
    strict_fp32,
)
from defenses._transfer import AdapterMode, adapter_field, trained_on_field
from harness.core.registry import HarnessError
from harness.core.defense import DefenseConfig, GradientPath, SetupContext, register_defense

_DATASET_HELP = "; None = the dataset's default"


@dataclass(frozen=True)
class COUPConfig(DefenseConfig):
    """Options of ``coup`` (None = the dataset's default, resolved at setup)."""

    t_star: float | None = field(default=None, metadata={"help": "start time t* of the reverse SDE (0.1 linf, 0.075 l2)" + _DATASET_HELP})
    dt: float | None = field(default=None, metadata={"help": "Euler-Maruyama step (1e-3 official)" + _DATASET_HELP})
    surrogate_steps: int | None = field(default=None, metadata={"help": "solver steps of the 'surrogate' gradient path" + _DATASET_HELP})
    t_end: float = field(default=T_END, metadata={"help": "where the reverse SDE stops"})
    guidance_scale: float = field(
        default=1.0, metadata={"help": "lambda, weight of grad log max_y p(y|x) (COUP --lmd_guide; 0 = COUP w/o guidance)"}
    )
    detach_guidance: bool = field(
        default=False, metadata={"help": "drop the guidance Jacobian from gradients (official adjoint behaviour); false = exact"}
    )
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
        if self.t_star is not None and not (self.t_end < self.t_star <= 1.0):
            raise HarnessError(f"coup: t_star={self.t_star} is out of range ({self.t_end} < t_star <= 1)")
        if self.dt is not None and not (self.dt > 0 and math.isfinite(self.dt)):
            raise HarnessError(f"coup: dt={self.dt} is out of range (must be > 0)")
        if self.surrogate_steps is not None and self.surrogate_steps < 1:
            raise HarnessError(f"coup: surrogate_steps={self.surrogate_steps} is out of range (must be >= 1)")
        if not math.isfinite(self.guidance_scale):
            raise HarnessError(f"coup: guidance_scale={self.guidance_scale} is not finite")
        if not 0 < self.t_end < 0.01:
            raise HarnessError(f"coup: t_end={self.t_end} is out of range (0 < t_end < 0.01)")


@register_defense("coup")
class COUP(DiffusionDefense):
    """COUP, classifier-confidence guided purification (Zhang et al. 2024, arXiv 2408.05900).

    ``x~ = clamp(2x - 1, -1, 1)``; guided reverse VP-SDE from t* to ``t_end`` started at
    x~ (no forward noise); output ``(clamp(x_0, -1, 1) + 1)/2``. Runs in plain float32
    (no autocast, no TF32).

    Randomness: one standard normal per solver step, drawn in order from the
    ``generator`` given to :meth:`purify`; the same generator state gives the same
    purification on every gradient path.

    Gradient paths and their cost (N = ceil((t* - t_end)/dt); per call N UNet
    evaluations (``nfe_per_call``) plus N classifier forward+backward passes):

    - ``full``: autograd through the N Euler-Maruyama steps with the noise fixed,
      checkpointed per step (in ceil(sqrt(N)) segments from 32 steps); includes the guidance Jacobian (Hessian-vector products
      of the classifier, ``create_graph``) unless ``detach_guidance``.
    - ``adjoint``: ``torchsde.sdeint_adjoint`` on the same Brownian increments; the
      drift's VJP includes the guidance Jacobian unless ``detach_guidance`` (official).
    - ``surrogate``: ``full`` through ``surrogate_steps`` steps.
    - ``bpda``: identity backward.

    Shape:
        x: (B, C, H, W) float32 in [0, 1] -> same shape, in [0, 1].

    Example:
        >>> d = COUP.from_dict({"guidance_scale": 1.0})
        >>> d.setup(ctx)                                     # binds ctx.classifier, loads the UNet
        >>> x_pur = d.purify(x, generator=torch.Generator().manual_seed(0))
    """

    version = "1"
    Config = COUPConfig
    gradient_paths = frozenset({GradientPath.BPDA, GradientPath.FULL, GradientPath.ADJOINT, GradientPath.SURROGATE})
    requires = frozenset({"classifier"})
    DEFAULTS = {"t_star": 0.1, "dt": 1e-3, "surrogate_steps": 10, "checkpoint": True}
    DATASET_DEFAULTS = {
        **{ds: {"t_star": 0.1, "dt": 0.02, "surrogate_steps": 2, "checkpoint": False} for ds in ("digits", "mnist5k")},
        # CIFAR-10 on a CPU with the shipped cifar10-ddpm: 10 Euler-Maruyama steps (dt 0.01) instead of 100, a 2-step
        # surrogate; checkpointing stays on (a 10-step trajectory of a batch of 32x32 images is several GB)
        "cifar10": {"t_star": 0.1, "dt": 0.01, "surrogate_steps": 2, "checkpoint": True},
        # ImageNet (guided-diffusion): DiffPure's t* for l_inf 4/255
        **{ds: {"t_star": 0.15} for ds in ("imagenet", "imagenet-rb5000")},
    }

    def __init__(self, config=None):
        super().__init__(config)
        # Not a registered submodule: the classifier belongs to the job, and the defense's
        # .to()/.double()/parameters() must not move or freeze it.
        object.__setattr__(self, "_classifier", None)

    def _count_nfe(self, cfg) -> int:
        return sde_steps(cfg.t_star, cfg.dt, cfg.t_end)

    @property
    def classifier_calls_per_call(self) -> int:
        """Classifier forward+backward passes per purification (one per solver step)."""
        return self.nfe_per_call if self.effective_config().guidance_scale != 0 else 0

    def bind_classifier(self, classifier: nn.Module) -> "COUP":
        """Set the classifier whose confidence guides purification ([0,1] input)."""
        object.__setattr__(self, "_classifier", classifier)
        return self

    def setup(self, ctx: SetupContext) -> None:
        if ctx.classifier is None:
            raise HarnessError("defense 'coup' needs the defended classifier (SetupContext.classifier is None)")
        self.bind_classifier(ctx.classifier)
        super().setup(ctx)

    def _guidance(self, cfg):
        if cfg.guidance_scale == 0:
            return None
        clf = self._classifier
        if clf is None:
            raise HarnessError("defense 'coup' has no classifier: call setup(ctx) (or bind_classifier) first")
        lam, exact = float(cfg.guidance_scale), not cfg.detach_guidance
        if self.adapter is not None:  # the defended classifier sees the purifier's images mapped back to the data's shape
            adapter, defended = self.adapter, clf

            def clf(u: torch.Tensor) -> torch.Tensor:
                return defended(adapter.from_purifier(u))

        def guidance(x: torch.Tensor) -> torch.Tensor:
            return lam * log_max_softmax_grad(clf, x, create_graph=exact)

        return guidance

    def _purify(self, x: torch.Tensor, generator: torch.Generator | None, *, steps: int | None, adjoint: bool) -> torch.Tensor:
        cfg = self.effective_config()
        n = steps if steps is not None else sde_steps(cfg.t_star, cfg.dt, cfg.t_end)
        with strict_fp32(x.device):
            x = self.adapt_in(x)
            xs = (2.0 * x - 1.0).clamp(-1.0, 1.0)
            sde = ReverseVPSDE(self._net(), tuple(x.shape[1:]), cfg.t_star, n, cfg.t_end, guidance=self._guidance(cfg))
            noise = draw_noise(xs, n, generator)
            x0 = integrate_adjoint(sde, xs, noise) if adjoint else integrate_em(sde, xs, noise, checkpoint=cfg.checkpoint)
            return self.adapt_out((x0.clamp(-1.0, 1.0) + 1.0) * 0.5)

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, steps=None, adjoint=False)

    def purify_adjoint(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, steps=None, adjoint=True)

    def purify_surrogate(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._purify(x, generator, steps=self.effective_config().surrogate_steps, adjoint=False)
