"""The defended forward pass and the per-batch random generators.

:class:`DefendedForward` maps [0,1] images to logits of the defended model along one
gradient path (``None``: the defense's own forward, what scoring uses). It implements
the attack contract's ``AttackedModel``: it says whether it is stochastic, holds the
EOT settings of its path, offers the EOT-averaged logits and gradient, counts the images
it purified (for NFE totals) and refuses non-finite outputs loudly. Non-finite input
gradients are refused too, whichever attack asks for them (the project's PGD, the
pyautoattack adapters, torchattacks' CW): the input passes through :class:`_FiniteGrad`,
an identity whose backward raises a one-line HarnessError naming the defense and the
path, so a NaN gradient never becomes a zero step that looks like robustness.

Randomness: every batch gets its own generators, derived from (seed, batch index,
stream), so evaluation noise is independent of the noise the attacker saw and a batch
recomputed after an interruption is bit-identical on the same machine.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from harness.core.defense import Defense, GradientPath
from harness.core.numerics import all_finite
from harness.core.registry import HarnessError
from harness.store.codec import dumps
from threat_models.eot import eot_forward, non_finite_gradient


class _FiniteGrad(torch.autograd.Function):
    """Identity whose backward refuses a non-finite gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, model):
        ctx.model = model
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if not all_finite(g):
            raise non_finite_gradient(ctx.model)
        return g, None


class DefendedForward(nn.Module):
    """[0,1] images -> logits of ``classifier(defense(x))`` along ``path``.

    Holds a generator so each call draws fresh purification noise (EOT samples stacked
    along the batch get independent noise).
    """

    #: its backward refuses non-finite input gradients (``_FiniteGrad``), so callers need not check again
    checks_gradients = True

    def __init__(
        self,
        defense: Defense,
        classifier: nn.Module,
        path: GradientPath | None,
        generator: torch.Generator | None,
        *,
        eot_samples: int = 1,
        eot_reduce: str = "loss",
        max_forward: int = 1024,
    ):
        super().__init__()
        self.defense, self.classifier, self.path, self.generator = defense, classifier, path, generator
        self.stochastic = bool(defense.stochastic and path is not GradientPath.CLASSIFIER)
        self.eot_samples, self.eot_reduce, self.max_forward = eot_samples, eot_reduce, max_forward
        self.purified = 0
        self.classified = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.classified += x.shape[0]
        if x.requires_grad and torch.is_grad_enabled():
            x = _FiniteGrad.apply(x, self)
        if self.path is GradientPath.CLASSIFIER:
            return self.classifier(x)
        self.purified += x.shape[0]
        logits = self.defense.classify(x, self.classifier, path=self.path, generator=self.generator)
        if not all_finite(logits):
            where = "evaluation" if self.path is None else f"{self.path.value} path"
            raise HarnessError(f"defense '{self.defense.name}' produced non-finite outputs (NaN/inf) on the {where}")
        return logits

    def eot(self, x: torch.Tensor, y: torch.Tensor, *, loss: str, need_grad: bool):
        """EOT-averaged logits, margin and (if ``need_grad``) gradient of the mean loss."""
        return eot_forward(
            self, x, y, eot=self.eot_samples, reduce=self.eot_reduce, loss=loss, max_batch=self.max_forward,
            need_grad=need_grad,
        )


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the job seed and a stream name (batch, purpose, attack label)."""
    h = hashlib.sha256(dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
