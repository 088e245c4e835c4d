"""Shared plumbing of the adapters over pyautoattack (AutoAttack's reference implementation).

The adapters call pyautoattack's single-run functions rather than ``perturb``: for
examples an attack does not break, ``perturb`` returns the clean input, which discards
the attack's work (and, for stochastic defenses, every example its last single draw did
not misclassify). Each adapter keeps per example the misclassifying iterate if the
attack found one, else its best iterate, and lets the engine re-score it with fresh
draws. pyautoattack draws its random starts from torch's global generator, so every
call runs inside ``torch.random.fork_rng`` seeded with the attack's seed.

**Batched EOT** (:class:`BatchedEOT`, the default; ``<attack>.eot_batch=false`` restores
pyautoattack's own loop). pyautoattack's APGD with ``eot_iter = K`` calls the model K
times per gradient, one batch of B images each, and averages the K gradients of its
summed loss. The adapters instead give it ``eot_iter = 1`` and a model that, when
pyautoattack asks for a gradient, evaluates the K draws in one call stacked along the
batch (chunks of at most ``max_forward`` images), computes each draw's own loss (the
attack's criterion, bound before each run) and returns the last draw's logits through
an autograd function whose backward is ``(1/K) sum_k d/dx sum_b loss(z_k)_b``. That is
the looped estimator exactly (the mean of per-draw loss gradients, not the gradient of
the loss of mean logits), and pyautoattack's per-iteration accuracy and loss bookkeeping
sees one draw's logits, as in the loop. The backward checks that the gradient arriving
at the logits is that of the bound loss, so a criterion the wrapper does not know fails
loudly rather than silently getting another loss's gradient.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.registry import HarnessError
from threat_models.eot import eot_draws
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


class _GraftEOT(torch.autograd.Function):
    """Logits ``z`` on the forward pass; the precomputed EOT input gradient on the backward pass."""

    @staticmethod
    def forward(ctx, x, z, grad_x, grad_z):
        ctx.save_for_backward(grad_x, grad_z)
        return z.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_z = ctx.saved_tensors
        if not torch.allclose(grad_out, grad_z, rtol=1e-4, atol=1e-6):
            raise HarnessError("batched EOT: the attack differentiated another loss than the one bound to the model wrapper")
        return grad_x, None, None, None


def criterion_of(att) -> Callable:
    """pyautoattack's per-example criterion for ``att.loss`` (read at call time: APGD-T's target changes)."""
    if att.loss == "ce":
        return lambda z, y: F.cross_entropy(z, y, reduction="none")
    fns = {"dlr": "dlr_loss", "dlr-targeted": "dlr_loss_targeted", "ce-targeted": "ce_loss_targeted"}
    if att.loss not in fns:
        raise HarnessError(f"batched EOT: no criterion for pyautoattack loss '{att.loss}'")
    return getattr(att, fns[att.loss])


class BatchedEOT(nn.Module):
    """The model handed to pyautoattack (with ``eot_iter=1``): K EOT draws per gradient in one stacked call.

    ``bind(att, y)`` before each ``attack_single_run`` (the labels of that run's batch).
    Calls without a gradient (target selection, accuracy checks) are one plain draw.
    ``calls`` counts the calls made to the attacked model.
    """

    def __init__(self, model, eot: int, max_batch: int):
        super().__init__()
        self.fn, self.k, self.max_batch = model, max(1, eot), max_batch
        self.att, self.y, self.calls = None, None, 0

    def bind(self, att, y: torch.Tensor) -> BatchedEOT:
        self.att, self.y = att, y
        return self

    def _counted(self, x):
        self.calls += 1
        return self.fn(x)

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad) or self.att is None:
            return self._counted(x)
        loss_fn = criterion_of(self.att)
        draws, grad_x = eot_draws(self._counted, x, self.y, eot=self.k, loss_fn=loss_fn, max_batch=self.max_batch)
        z = draws[-1]
        with torch.enable_grad():
            zl = z.clone().requires_grad_(True)
            grad_z = torch.autograd.grad(loss_fn(zl, self.y).sum(), zl)[0]
        return _GraftEOT.apply(x, z, grad_x, grad_z)


def eot_model(model, batched: bool):
    """(module for pyautoattack, its eot_iter): the batched wrapper, or pyautoattack's own loop."""
    if batched and getattr(model, "eot_samples", 1) > 1:
        return BatchedEOT(model, model.eot_samples, getattr(model, "max_forward", 1024)), 1
    return AsModule(model), getattr(model, "eot_samples", 1)
