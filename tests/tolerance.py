"""Float comparisons that hold on any CPU and thread count: tolerances in units of the dtype's eps at the tensor's scale.

Two computations of one quantity in float32 (batched and looped, chunked and whole, two
thread counts) differ by their summation orders: a few eps *of the magnitudes summed*, which
for an element near zero is far more than eps of that element. A fixed ``atol=1e-6`` then
fails on one element of a thousand on some CPUs (tests/test_cmap.py failed so on an AMD
EPYC). :func:`assert_close_scaled` allows ``k`` eps of the tensor's largest magnitude per
element, plus ``k`` eps relative; where agreement must be exact up to rounding of a few
operations, compare in float64 instead.
"""

from __future__ import annotations

import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, *, k: float = 64, msg: str | None = None) -> None:
    """``|actual - expected| <= k eps (max|expected| + |expected|)`` elementwise, eps of ``expected``'s dtype."""
    eps = torch.finfo(expected.dtype).eps
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=k * eps, atol=k * eps * scale, msg=msg)
