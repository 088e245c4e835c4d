"""Reinhard et al. (2001) colour transfer: MAEP's ColoredImageNet shift (spec 3.7), for any dataset.

Each content image is recoloured to the colour statistics of a *target* image drawn from
the same evaluation subset: per channel, ``c_out = (sigma_t / sigma_s)(c - mu_s) + mu_t``
in a decorrelated colour space, then back to RGB and clipped to [0, 1]. Labels are kept.

- ``space=lalphabeta`` (default): the original l-alpha-beta space (RGB -> LMS -> log10
  with 1e-6 added -> l-alpha-beta, the paper's matrices; :mod:`threat_models.shifts._color`).
  Pixel values are used as they are (the harness's [0, 1] images), as common
  implementations do, not linearised first.
- ``space=lab``: CIE L*a*b* through kornia's sRGB conversions (the OpenCV-based
  ``color_transfer`` variant, scale sigma_t / sigma_s).
- Single-channel images: both reduce to matching the mean and standard deviation of the
  intensity.

**Pairing.** The target of the example at subset position p is position
``t(p) = h(seed, p) mod (n - 1)``, skipping p itself (h: sha256 of the job seed and p), so
the pairing depends only on the job seed, the position and the subset size n, never on
the batching. The target is an *unshifted* image. Its position and dataset index are
returned as per-example ``info`` (stored with the batch: ``target_position``,
``target_index``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from harness.core.shift import Shift, ShiftConfig, register_shift
from threat_models.shifts._color import as_rgb, from_rgb, lalphabeta_to_rgb, match_moments, rgb_to_lalphabeta


@dataclass(frozen=True)
class ReinhardConfig(ShiftConfig):
    """Options of the Reinhard colour transfer (``--set space=lab``)."""

    space: Literal["lalphabeta", "lab"] = field(
        default="lalphabeta", metadata={"help": "lalphabeta: Reinhard's log-LMS space (default); lab: CIE L*a*b* (kornia)"}
    )


def target_positions(seed: int, positions: np.ndarray, n: int) -> np.ndarray:
    """The target position of every content position (uniform over the other n - 1 positions)."""
    out = np.empty(len(positions), dtype=np.int64)
    for i, p in enumerate(np.asarray(positions, dtype=np.int64)):
        if n < 2:
            out[i] = p
            continue
        h = hashlib.sha256(f"reinhard-target:{int(seed)}:{int(p)}".encode()).digest()
        t = int.from_bytes(h[:8], "little") % (n - 1)
        out[i] = t + 1 if t >= p else t
    return out


def reinhard_transfer(content: torch.Tensor, target: torch.Tensor, space: str = "lalphabeta") -> torch.Tensor:
    """Recolour each content image to the statistics of its target (both (B, C, H, W) in [0, 1]; C = 1 or 3)."""
    if content.shape[1] == 1:
        return match_moments(content.double(), target.double()).clamp(0, 1).to(content.dtype)
    if space == "lab":
        from kornia.color import lab_to_rgb, rgb_to_lab

        out = lab_to_rgb(match_moments(rgb_to_lab(content), rgb_to_lab(target)), clip=True)
    else:
        out = lalphabeta_to_rgb(match_moments(rgb_to_lalphabeta(content), rgb_to_lalphabeta(target)))
    return from_rgb(as_rgb(out), content.shape[1]).clamp(0, 1).to(content.dtype)


@register_shift("reinhard")
class Reinhard(Shift):
    """Reinhard colour transfer to a seeded target image of the evaluation subset (see the module docstring)."""

    description = "Reinhard et al. 2001 colour transfer to a seeded target of the evaluation subset (space=lalphabeta|lab)"
    Config = ReinhardConfig

    def check(self, image_shape):
        if image_shape[0] not in (1, 3):
            return f"needs 1- or 3-channel images, got {image_shape[0]} channels"
        return None

    def apply(self, x, y, *, context):
        n = len(context.subset_x)
        tpos = target_positions(context.seed, context.positions, n)
        target = context.subset_x[torch.from_numpy(tpos)].to(device=x.device, dtype=x.dtype)
        out = reinhard_transfer(x, target, self.config.space)
        idx = context.subset_indices
        info = {"target_position": tpos.tolist(), "target_index": (idx[tpos] if idx is not None else tpos).tolist()}
        return out, info
