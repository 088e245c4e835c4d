"""The CIFAR-10-C colour corruptions' shared base (not a plugin: the underscore keeps it unregistered).

Hendrycks & Dietterich (ICLR 2019), ``make_cifar_c.py``: each corruption has five
severities with one constant each (see the subclasses). The corruption libraries
(``imagecorruptions``, ``imagenet_c``) fail on current scikit-image (spec section 9), so
the formulas are computed here in torch, with kornia's HSV conversions where HSV is
needed. Unlike the published files, no 8-bit truncation follows (the harness works on
float images in [0, 1]). Deterministic: no randomness is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from harness.core.shift import Shift, ShiftConfig
from threat_models.shifts._color import as_rgb, from_rgb


@dataclass(frozen=True)
class SeverityConfig(ShiftConfig):
    severity: int = field(default=1, metadata={"help": "CIFAR-10-C severity, 1 (mild) to 5"})

    def __post_init__(self):
        if not 1 <= self.severity <= 5:
            raise ValueError(f"severity={self.severity} is out of range (1..5)")


class CorruptionShift(Shift):
    """Base of the severity-indexed corruptions: ``constant`` is the CIFAR-10-C value of the configured severity."""

    Config = SeverityConfig
    #: the CIFAR-10-C constants of severities 1..5
    CONSTANTS: ClassVar[tuple] = ()

    @property
    def constant(self):
        """The corruption's constant at the configured severity."""
        return self.CONSTANTS[self.config.severity - 1]

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The corrupted batch (float32 NCHW in [0, 1])."""
        raise NotImplementedError

    def apply(self, x, y, *, context):
        return self.corrupt(x).clamp(0, 1)


def edit_hsv(x: torch.Tensor, channel: int, scale: float, offset: float) -> torch.Tensor:
    """RGB -> HSV (kornia), ``c = clip(c * scale + offset, 0, 1)`` on one HSV channel, -> RGB.

    Single-channel images go through as grey RGB (hue and saturation 0, value = intensity).
    """
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(as_rgb(x))
    parts = list(hsv.unbind(1))
    parts[channel] = (parts[channel] * scale + offset).clamp(0, 1)
    return from_rgb(hsv_to_rgb(torch.stack(parts, 1)), x.shape[1])
