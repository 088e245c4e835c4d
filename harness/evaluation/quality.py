"""Image-quality metrics between purified and clean images: PSNR and SSIM.

Both take float tensors in [0, 1], shape (N, C, H, W), and return one value per image.

- PSNR = 10 log10(1 / MSE) in dB, with the MSE floored at 1e-10 so that an identical
  pair (the ``none`` defense on clean inputs) gives a finite 100 dB instead of infinity.
- SSIM (Wang et al. 2004) with a Gaussian window of std 1.5 and size 11, shrunk to the
  largest odd size that fits small images (7 for 8x8 digits), "valid" filtering,
  C1 = (0.01)^2, C2 = (0.03)^2 for data range 1, averaged over positions and channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_MAX_DB = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(10 ** (-PSNR_MAX_DB / 10))
    return -10 * torch.log10(mse)


def _window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    c = a.shape[1]
    size = min(win, a.shape[-1], a.shape[-2])
    if size % 2 == 0:
        size -= 1
    w = _window(size, sigma, a.dtype, a.device).expand(c, 1, size, size)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a**2
    s_bb = filt(b * b) - mu_b**2
    s_ab = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return (num / den).flatten(1).mean(1)
