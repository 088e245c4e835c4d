"""CIFAR-10-C ``contrast``: scale every pixel's distance to its channel mean by c (Hendrycks & Dietterich 2019).

``c = 0.75, 0.5, 0.4, 0.3, 0.15`` for severities 1-5; ``x <- clip((x - m) c + m, 0, 1)``
with m the per-image, per-channel mean over all pixels (``np.mean(x, axis=(0, 1))`` of
an HWC image, as ``make_cifar_c.py``).
"""

from harness.core.shift import register_shift
from threat_models.shifts._corruptions import CorruptionShift


@register_shift("contrast")
class Contrast(CorruptionShift):
    """CIFAR-10-C contrast at ``severity`` 1-5 (labels kept)."""

    description = "CIFAR-10-C contrast: (x - channel mean) * (0.75, 0.5, 0.4, 0.3, 0.15)[severity-1] + mean"
    CONSTANTS = (0.75, 0.5, 0.4, 0.3, 0.15)

    def corrupt(self, x):
        m = x.mean((2, 3), keepdim=True)
        return (x - m) * self.constant + m
