"""Consistency models (Song et al. 2023) as CMAP uses them: parameterisation, grid, one-step generation.

The consistency function maps a noisy image at noise level t (VE / EDM convention:
x_t = x_0 + t * z, images in [-1, 1]) straight to an estimate of x_0::

    f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))
    c_in(t)   = 1 / sqrt(t^2 + sigma_d^2)
    c_skip(t) = sigma_d^2 / ((t - t_min)^2 + sigma_d^2)
    c_out(t)  = (t - t_min) sigma_d / sqrt(t^2 + sigma_d^2)

with sigma_d = 0.5, t_min = 0.002, T = 80 and the Karras grid (rho = 7) of the official
CIFAR-10 consistency models (spec section 2.4), so f(x, t_min) = x exactly. One-step
generation is G(z) = f(T z, T) with z ~ N(0, I): CMAP optimises z.

``c_noise`` is what the network F gets as its time input. The official models feed
``0.25 ln t`` to a Fourier embedding (``time_input="log"``, scaled by ``time_scale`` for
a positional embedding); the harness's own small models, distilled from a DDPM of the
same architecture, feed the DDPM timestep index n(t) whose alpha-bar is 1 / (1 + t^2)
(``time_input="ddpm-index"``), so the student starts from the teacher's weights and
time embedding. Both are recorded with the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defenses._diffusion import discrete_alpha_bar
from harness.core.env import sha256_file
from harness.core.registry import HarnessError, MissingFileError, first_line

SIGMA_DATA, T_MIN, T_MAX, RHO = 0.5, 0.002, 80.0, 7.0
TIME_INPUTS = ("log", "ddpm-index")


def karras_grid(n: int, t_min: float = T_MIN, t_max: float = T_MAX, rho: float = RHO) -> torch.Tensor:
    """The n noise levels t_0 = t_min < ... < t_{n-1} = t_max of Karras et al. (float64)."""
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return (t_min ** (1 / rho) + i * (t_max ** (1 / rho) - t_min ** (1 / rho))) ** rho


_LOG_AB = None


def ddpm_index(t: torch.Tensor) -> torch.Tensor:
    """Fractional index n of the DDPM linear schedule (1000 steps) with alpha-bar_n = 1 / (1 + t^2).

    Interpolated linearly in log alpha-bar; clamped to [0, 999] (t below the schedule's
    smallest noise level, about 0.01, maps to 0).
    """
    global _LOG_AB
    if _LOG_AB is None:
        _LOG_AB = np.log(discrete_alpha_bar().numpy())
    target = -np.log1p(np.square(t.detach().double().cpu().numpy()))
    # log alpha-bar decreases with n: interpolate on the reversed (increasing) arrays
    n = np.interp(-target, -_LOG_AB, np.arange(len(_LOG_AB), dtype=np.float64))
    return torch.as_tensor(n, dtype=torch.float32, device=t.device)


class ConsistencyFunction(nn.Module):
    """f(x, t) around a network F(x, time) (a ``diffusers.UNet2DModel`` or an NCSN++).

    Args:
        net: F; called as ``net(x, time)`` and may return an object with ``.sample``.
        sigma_data, t_min, t_max: the parameterisation's constants.
        time_input: ``log`` (c_noise = time_scale * 0.25 ln t) or ``ddpm-index``.
        time_scale: multiplies the ``log`` time input (1 for a Fourier embedding).
    """

    def __init__(
        self, net: nn.Module, *, sigma_data: float = SIGMA_DATA, t_min: float = T_MIN, t_max: float = T_MAX,
        time_input: str = "log", time_scale: float = 1.0,
    ):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise HarnessError(f"consistency model time_input must be one of {', '.join(TIME_INPUTS)}, got '{time_input}'")
        self.net = net
        self.sigma_data, self.t_min, self.t_max = float(sigma_data), float(t_min), float(t_max)
        self.time_input, self.time_scale = time_input, float(time_scale)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_in(t), c_skip(t), c_out(t) per sample, shaped like ``t`` (the square root uses t, not t - t_min)."""
        sd, tm = self.sigma_data, self.t_min
        c_in = 1 / torch.sqrt(t**2 + sd**2)
        c_skip = sd**2 / ((t - tm) ** 2 + sd**2)
        c_out = (t - tm) * sd / torch.sqrt(t**2 + sd**2)
        return c_in, c_skip, c_out

    def noise_input(self, t: torch.Tensor) -> torch.Tensor:
        """What F gets as its time input."""
        if self.time_input == "log":
            return self.time_scale * 0.25 * torch.log(t)
        return ddpm_index(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        c_in, c_skip, c_out = (c.view(-1, *([1] * (x.dim() - 1))) for c in self.coefficients(t))
        out = self.net(c_in * x, self.noise_input(t))
        out = getattr(out, "sample", out)
        return c_skip * x + c_out * out

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """One-step generation G(z) = f(T z, T), in [-1, 1] (not clamped)."""
        return self(self.t_max * z, self.t_max)


def consistency_record(fn: ConsistencyFunction) -> dict[str, Any]:
    """The parameterisation as it is stored beside the weights."""
    return {
        "sigma_data": fn.sigma_data, "t_min": fn.t_min, "t_max": fn.t_max, "time_input": fn.time_input,
        "time_scale": fn.time_scale,
    }


def load_consistency(path: Path) -> tuple[ConsistencyFunction, dict[str, Any]]:
    """A ``diffusers.UNet2DModel`` consistency model from ``<name>.pt`` and its ``<name>.json`` recipe.

    The recipe holds ``unet_config`` and ``consistency`` (the parameterisation); its sha256
    must match the file.
    """
    from diffusers import UNet2DModel

    recipe_path = path.with_suffix(".json")
    if not path.is_file():
        raise MissingFileError(f"consistency model '{path}' does not exist")
    if not recipe_path.is_file():
        raise HarnessError(f"consistency model '{path}' has no recipe '{recipe_path.name}' beside it (it holds the architecture)")
    try:
        recipe = json.loads(recipe_path.read_text())
        unet_config, cm = dict(recipe["unet_config"]), dict(recipe["consistency"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HarnessError(
            f"consistency recipe '{recipe_path}' is unreadable or lacks unet_config/consistency: {first_line(exc)}"
        ) from None
    digest = sha256_file(path)
    if recipe.get("sha256") and recipe["sha256"] != digest:
        raise HarnessError(f"consistency model '{path}' has sha256 {digest[:12]}..., its recipe says {recipe['sha256'][:12]}...")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        unet = UNet2DModel(**unet_config)
        unet.load_state_dict(state, strict=True)
        fn = ConsistencyFunction(unet, **cm)
    except Exception as exc:
        raise HarnessError(f"consistency model '{path.name}' does not fit its recipe: {first_line(exc)}") from None
    return fn, {"kind": "consistency-recipe", "name": path.stem, "sha256": digest, "consistency": cm}


def one_step_samples(fn: ConsistencyFunction, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """N one-step samples in [0, 1] (for the sample grid and the tests)."""
    z = torch.randn((n, *shape), generator=generator)
    with torch.no_grad():
        return ((fn.generate(z) + 1) / 2).clamp(0, 1)


def check_grid(n: int) -> None:
    """A Karras grid needs at least two levels."""
    if n < 2 or not math.isfinite(n):
        raise HarnessError(f"a consistency grid needs at least 2 noise levels, got {n}")
