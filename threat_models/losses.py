"""Attack losses on logits (spec section 3.1), per example; higher is more adversarial."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "cw", "dlr")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - z_y


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AutoAttack's difference-of-logits-ratio loss."""
    srt, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = (logits.argmax(1) == y).float()
    z_other = srt[:, -2] * top_is_y + srt[:, -1] * (1 - top_is_y)
    return -(z_y - z_other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-example loss ``name`` (ce, cw or dlr)."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "cw":
        return margin(logits, y)
    return dlr_loss(logits, y)
