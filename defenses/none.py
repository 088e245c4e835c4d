"""The undefended baseline: the identity purifier.

Deterministic, zero NFE; every gradient path is exact (the identity). Its numbers are
the reference against which every purifier is judged: a purifier that does not beat
``none`` under the adaptive threat does not defend.
"""

from __future__ import annotations

import torch

from harness.core.defense import Defense, GradientPath, register_defense


@register_defense("none")
class NoDefense(Defense):
    """Identity purifier (no defense).

    Shape:
        x: (N, C, H, W) float32 in [0, 1] -> same.
    """

    version = "1"
    stochastic = False
    identity_purifier = True
    gradient_paths = frozenset({GradientPath.BPDA, GradientPath.FULL})
    nfe_per_call = 0

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return x
