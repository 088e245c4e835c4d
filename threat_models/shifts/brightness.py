"""CIFAR-10-C ``brightness``: add c to the HSV value channel (Hendrycks & Dietterich 2019).

``c = 0.05, 0.1, 0.15, 0.2, 0.3`` for severities 1-5; ``V <- clip(V + c, 0, 1)``, back to
RGB (kornia's HSV). On single-channel images V is the intensity, so this is
``clip(x + c, 0, 1)``.
"""

from harness.core.shift import register_shift
from threat_models.shifts._corruptions import CorruptionShift, edit_hsv


@register_shift("brightness")
class Brightness(CorruptionShift):
    """CIFAR-10-C brightness at ``severity`` 1-5 (labels kept)."""

    description = "CIFAR-10-C brightness: HSV value + (0.05, 0.1, 0.15, 0.2, 0.3)[severity-1]"
    CONSTANTS = (0.05, 0.1, 0.15, 0.2, 0.3)

    def corrupt(self, x):
        return edit_hsv(x, 2, 1.0, self.constant)
