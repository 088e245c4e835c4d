"""Toy defenses used by the tests, loaded the way a user loads a plugin (``--plugin``).

- ``toy-smooth``: deterministic, differentiable (a fixed blur then a sigmoid squash):
  a purifier whose exact gradient is known to autograd, for finite-difference checks.
- ``toy-noise``: stochastic (Gaussian noise from the generator, then a blur): exercises
  EOT, R-draw scoring and generator reproducibility.
- ``toy-slow``: a deterministic blur that sleeps a configured delay per call (resume tests).
- ``toy-quantize``: gradient masking (rounding to 4 grey levels, zero gradient almost
  everywhere): the classic "broken" defense. Its full gradient is useless, BPDA breaks it.
- ``toy-numpy``: a non-differentiable purifier (a round trip through numpy, as JPEG or
  a test-time optimisation would be) that declares only the ``bpda`` path.
- ``toy-nan``, ``toy-range``: broken purifiers (NaN outputs; outputs outside [0, 1]).
- ``toy-nan-grad``: the identity with a NaN gradient (the engine must stop, not step by zero).
- ``toy-hidden-noise``: declared deterministic, but noisy (torch's global generator): flagged ``randomness_detected``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import torch
import torch.nn.functional as F

from harness.core import Defense, DefenseConfig, GradientPath, randn_like, register_defense


def _blur(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)


@dataclass(frozen=True)
class SmoothConfig(DefenseConfig):
    sharpness: float = field(default=4.0, metadata={"help": "slope of the sigmoid squash"})


@register_defense("toy-smooth")
class ToySmooth(Defense):
    """Deterministic toy purifier: blur, then a sigmoid squash around 0.5."""

    Config = SmoothConfig
    gradient_paths = frozenset({GradientPath.FULL, GradientPath.SURROGATE})
    has_detection_score = True
    nfe_per_call = 1

    def purify(self, x, *, generator=None):
        return torch.sigmoid(self.config.sharpness * (_blur(x) - 0.5))

    def detection_score(self, x, *, generator=None):
        # high-frequency energy: what the blur removes
        return (x - _blur(x)).flatten(1).norm(dim=1)

    def purify_surrogate(self, x, *, generator=None):
        return _blur(x)


@dataclass(frozen=True)
class NoiseConfig(DefenseConfig):
    sigma: float = field(default=0.25, metadata={"help": "std of the injected Gaussian noise"})


@register_defense("toy-noise")
class ToyNoise(Defense):
    """Stochastic toy purifier: add Gaussian noise, blur, clamp."""

    Config = NoiseConfig
    stochastic = True
    gradient_paths = frozenset({GradientPath.FULL})
    nfe_per_call = 1

    def purify(self, x, *, generator=None):
        return _blur(x + self.config.sigma * randn_like(x, generator)).clamp(0, 1)


@dataclass(frozen=True)
class SlowConfig(DefenseConfig):
    delay: float = field(default=0.0, metadata={"help": "seconds slept per purify call"})


@register_defense("toy-slow")
class ToySlow(Defense):
    """Deterministic blur that sleeps ``delay`` seconds per call: a job slow enough to be
    killed mid-way by the resume test, whatever the speed of the machine.
    """

    Config = SlowConfig
    gradient_paths = frozenset({GradientPath.FULL, GradientPath.BPDA})
    default_examples = {"purifier-gradient": 24}  # costly cells, subsampled unless the user says otherwise
    nfe_per_call = 1

    def setup(self, ctx):
        if self.config.delay > 0:
            self.setup_notes = [f"toy-slow: sleeps {self.config.delay} s per purification"]

    def purify(self, x, *, generator=None):
        time.sleep(self.config.delay)
        return _blur(x)


@register_defense("toy-quantize")
class ToyQuantize(Defense):
    """Gradient-masking toy purifier: round to 4 grey levels (zero gradient a.e.)."""

    gradient_paths = frozenset({GradientPath.FULL})

    def purify(self, x, *, generator=None):
        return torch.round(x * 3) / 3


@register_defense("toy-nan")
class ToyNaN(Defense):
    """A broken purifier that returns NaN: the engine must refuse its numbers loudly."""

    def purify(self, x, *, generator=None):
        return x * float("nan")


@register_defense("toy-numpy")
class ToyNumpy(Defense):
    """Non-differentiable purifier: 8-level quantisation computed in numpy (declares only bpda)."""

    gradient_paths = frozenset({GradientPath.BPDA})

    def purify(self, x, *, generator=None):
        a = x.detach().cpu().numpy()
        return torch.from_numpy(np.round(a * 7) / 7).to(device=x.device, dtype=x.dtype)


@register_defense("toy-range")
class ToyRange(Defense):
    """A broken purifier whose outputs leave [0, 1] (the contract): the engine must refuse it."""

    def purify(self, x, *, generator=None):
        return 2 * x - 0.5


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


@register_defense("toy-nan-grad")
class ToyNaNGrad(Defense):
    """The identity on the forward pass with a NaN gradient: the engine must refuse it, never step by zero."""

    gradient_paths = frozenset({GradientPath.FULL})

    def purify(self, x, *, generator=None):
        return _NaNGrad.apply(x)


@register_defense("toy-hidden-noise")
class ToyHiddenNoise(Defense):
    """Declared deterministic but adds noise from torch's global generator: flagged ``randomness_detected``."""

    gradient_paths = frozenset({GradientPath.FULL})

    def purify(self, x, *, generator=None):
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
