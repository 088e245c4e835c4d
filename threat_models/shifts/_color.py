"""Colour maths shared by the colour shifts (not a plugin: the underscore keeps it unregistered).

- :func:`rgb_to_lalphabeta` / :func:`lalphabeta_to_rgb`: Reinhard et al. (2001)'s
  l-alpha-beta space, written out here because no maintained library ships it (kornia
  and scikit-image have CIE L*a*b*, not Ruderman's log-LMS decorrelated space); the
  matrices are the paper's (spec 3.7).
- :func:`match_moments`: per-image, per-channel mean and standard deviation matching.
- :func:`as_rgb` / :func:`from_rgb`: run an RGB-only transform on single-channel images
  (replicate the grey channel, transform, take the mean back).

HSV and CIE L*a*b* conversions come from kornia (``kornia.color``), which works on
batched NCHW tensors in torch.
"""

from __future__ import annotations

import math

import torch

#: Reinhard et al. 2001, RGB -> LMS.
RGB_TO_LMS = torch.tensor([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]], dtype=torch.float64)
#: Reinhard et al. 2001 print LMS -> RGB as [[4.4679, -3.5873, 0.1193], [-1.2186, 2.3809, -0.1624],
#: [0.0497, -0.2439, 1.2045]], which is the inverse of RGB_TO_LMS only to 0.017 per entry (a grey
#: image would come back 0.6% off); the exact inverse is used, so a target recoloured to itself is unchanged.
LMS_TO_RGB = torch.linalg.inv(RGB_TO_LMS)
#: log-LMS -> l-alpha-beta: diag(1/sqrt 3, 1/sqrt 6, 1/sqrt 2) [[1,1,1],[1,1,-2],[1,-1,0]].
LMS_TO_LAB = torch.diag(torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)], dtype=torch.float64)) @ torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]], dtype=torch.float64
)
#: l-alpha-beta -> log-LMS: [[1,1,1],[1,1,-1],[1,-2,0]] diag(sqrt 3/3, sqrt 6/6, sqrt 2/2).
LAB_TO_LMS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -2.0, 0.0]], dtype=torch.float64) @ torch.diag(
    torch.tensor([math.sqrt(3) / 3, math.sqrt(6) / 6, math.sqrt(2) / 2], dtype=torch.float64)
)
#: Added before the log (spec 3.7) and removed after the exponential, so black pixels stay finite.
LOG_EPS = 1e-6


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel axis of (B, 3, H, W)."""
    return torch.einsum("ij,bjhw->bihw", m.to(x.dtype), x)


def rgb_to_lalphabeta(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> l-alpha-beta (Reinhard et al. 2001), computed in float64."""
    lms = _mix(RGB_TO_LMS, x.double())
    return _mix(LMS_TO_LAB, torch.log10(lms.clamp_min(0) + LOG_EPS))


def lalphabeta_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lalphabeta` (float64, not clipped)."""
    lms = torch.pow(10.0, _mix(LAB_TO_LMS, lab.double())) - LOG_EPS
    return _mix(LMS_TO_RGB, lms)


def match_moments(src: torch.Tensor, tgt: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    """``(sigma_t / sigma_s)(src - mu_s) + mu_t`` per image and channel (statistics over all pixels).

    Standard deviations are the population ones (numpy's default, as OpenCV-based
    implementations use); a channel whose source std is below ``min_std`` (a constant
    image) is mapped to the target mean rather than divided by zero.
    """
    mu_s, sd_s = src.mean((2, 3), keepdim=True), src.std((2, 3), keepdim=True, correction=0)
    mu_t, sd_t = tgt.mean((2, 3), keepdim=True), tgt.std((2, 3), keepdim=True, correction=0)
    return (src - mu_s) * (sd_t / sd_s.clamp_min(min_std)) + mu_t


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """Single-channel images replicated to three channels; RGB images unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def from_rgb(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Back to ``channels`` channels (the mean of the three for grey images, which are equal there)."""
    return x.mean(1, keepdim=True) if channels == 1 else x
