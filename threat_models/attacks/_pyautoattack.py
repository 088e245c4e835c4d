"""Shared plumbing of the adapters over pyautoattack (AutoAttack's reference implementation).

The adapters call pyautoattack's single-run functions rather than ``perturb``: for
examples an attack does not break, ``perturb`` returns the clean input, which discards
the attack's work (and, for stochastic defenses, every example its last single draw did
not misclassify). Each adapter keeps per example the misclassifying iterate if the
attack found one, else its best iterate, and lets the engine re-score it with fresh
draws. pyautoattack draws its random starts from torch's global generator, so every
call runs inside ``torch.random.fork_rng`` seeded with the attack's seed.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn

from threat_models.losses import margin


def pyautoattack():
    """Import pyautoattack, aliased as ``autoattack`` (the name robustbench imports)."""
    import pyautoattack as pa

    sys.modules.setdefault("autoattack", pa)
    return pa


class AsModule(nn.Module):
    """A callable as an ``nn.Module`` (pyautoattack calls ``model(x)``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's global generator seeded, restoring the caller's stream after."""
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def final_margin(model, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margin of one defended forward pass at the returned examples."""
    return margin(model(x_adv), y)


def where_broken(broken: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per example ``a`` where ``broken`` else ``b``."""
    return torch.where(broken.view(-1, *([1] * (a.dim() - 1))), a, b)
