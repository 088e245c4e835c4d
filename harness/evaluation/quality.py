"""Image-quality metrics between purified and clean images: PSNR and SSIM.

Both take float tensors in [0, 1], shape (N, C, H, W), and return one value per image.

- PSNR = 10 log10(1 / MSE) in dB, with the MSE floored at 1e-10 so that an identical
  pair (the ``none`` defense on clean inputs) gives a finite 100 dB instead of infinity.
- SSIM (Wang et al. 2004) from pytorch-msssim, differentiable (CMAP optimises it), with
  a Gaussian window of std 1.5 and size 11, shrunk to the largest odd size that fits
  small images (7 for 8x8 digits), "valid" filtering, K = (0.01, 0.03) for data range 1,
  averaged over positions and channels. The same function serves the stored quality
  metrics and CMAP's loss; ``tests/test_quality.py`` checks it against the formula.
"""

from __future__ import annotations

import torch

PSNR_MAX_DB = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (capped at :data:`PSNR_MAX_DB`)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(10 ** (-PSNR_MAX_DB / 10))
    return -10 * torch.log10(mse)


def ssim_window(h: int, w: int, win: int = 11) -> int:
    """The SSIM window size for h x w images: ``win``, or the largest odd size that fits."""
    size = min(win, h, w)
    return size - 1 if size % 2 == 0 else size


def ssim(a: torch.Tensor, b: torch.Tensor, *, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of images in [0, 1] (differentiable)."""
    from pytorch_msssim import ssim as _ssim

    size = ssim_window(a.shape[-2], a.shape[-1], win)
    return _ssim(a, b, data_range=1.0, size_average=False, win_size=size, win_sigma=sigma)
