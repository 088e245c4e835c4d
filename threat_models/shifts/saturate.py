"""CIFAR-10-C ``saturate``: ``S <- clip(S a + b, 0, 1)`` on the HSV saturation (Hendrycks & Dietterich 2019).

``(a, b) = (0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)`` for severities 1-5
(``make_cifar_c.py``; the ImageNet-C constants are larger). Severities 1-2 desaturate
and 3-5 oversaturate, so the severity is not monotone in saturation. Grey images have
no saturation to change: refused on single-channel datasets.
"""

from harness.core.shift import register_shift
from threat_models.shifts._corruptions import CorruptionShift, edit_hsv


@register_shift("saturate")
class Saturate(CorruptionShift):
    """CIFAR-10-C saturate at ``severity`` 1-5 (labels kept; RGB images only)."""

    description = "CIFAR-10-C saturate: HSV saturation * a + b, (a, b) by severity; RGB only"
    CONSTANTS = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))

    def check(self, image_shape):
        if image_shape[0] != 3:
            return f"saturation is undefined on {image_shape[0]}-channel images (needs RGB)"
        return None

    def corrupt(self, x):
        a, b = self.constant
        return edit_hsv(x, 1, a, b)
