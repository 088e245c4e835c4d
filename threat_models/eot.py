"""Expectation over transformation: EOT samples stacked along the batch dimension.

For a stochastic defense the defended forward draws fresh purification noise on every
call, so ``eot`` copies of the batch stacked along the batch dimension are ``eot``
independent draws, computed in one forward pass (chunks of at most ``max_batch``
images when that does not fit).
"""

from __future__ import annotations

from typing import Callable

import torch

from harness.core.numerics import all_finite
from harness.core.registry import HarnessError
from threat_models.losses import attack_loss, margin

Model = Callable[[torch.Tensor], torch.Tensor]


def _stacked(t: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` copies of ``t`` along the batch dimension (``t`` itself, not a copy, when ``k`` is 1)."""
    return t if k == 1 else t.repeat(k, *([1] * (t.dim() - 1)))


def eot_forward(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eot: int, reduce: str, loss: str, max_batch: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """EOT-averaged logits, margin and (optionally) the gradient of the mean loss.

    ``reduce='loss'`` averages the per-sample losses (standard EOT);
    ``reduce='logits'`` averages logits first (DiffPure's BPDA+EOT).
    """
    B = x.shape[0]
    per_chunk = max(1, min(eot, max_batch // max(B, 1)))
    xin = x.detach().clone().requires_grad_(need_grad)
    grad = torch.zeros_like(x) if need_grad else None
    chunks = []
    done = 0
    with torch.set_grad_enabled(need_grad):
        while done < eot:
            k = min(per_chunk, eot - done)
            logits = model(_stacked(xin, k)).view(k, B, -1)
            if need_grad and reduce == "loss":
                # the mean of per-sample losses decomposes over chunks: free each chunk's graph
                obj = attack_loss(loss, logits.reshape(k * B, -1), _stacked(y, k)).sum() / eot
                grad += torch.autograd.grad(obj, xin)[0]
                logits = logits.detach()
            chunks.append(logits)
            done += k
        mean_logits = torch.cat(chunks, 0).mean(0)
        if need_grad and reduce == "logits":
            # the loss of averaged logits does not decompose: one backward over all chunks
            grad = torch.autograd.grad(attack_loss(loss, mean_logits, y).sum(), xin)[0]
    # a model that refuses non-finite gradients in its own backward (DefendedForward) has checked them already
    if need_grad and not getattr(model, "checks_gradients", False) and not all_finite(grad):
        raise non_finite_gradient(model)
    mean_logits = mean_logits.detach()
    return mean_logits, margin(mean_logits, y), grad


def non_finite_gradient(model) -> HarnessError:
    """The one-line error for a NaN/inf attack gradient, naming the defense and the path where the model knows them.

    Never replaced by zero: a zero step looks like robustness.
    """
    defense, path = getattr(getattr(model, "defense", None), "name", None), getattr(model, "path", None)
    if defense is None:
        return HarnessError("the attacked model has non-finite input gradients (NaN/inf)")
    where = "the evaluation forward" if path is None else f"the {getattr(path, 'value', path)} gradient path"
    return HarnessError(f"defense '{defense}' has non-finite input gradients (NaN/inf) on {where}")


def eot_draws(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eot: int, loss_fn: Callable, max_batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw logits (eot, B, C) and the EOT gradient ``(1/eot) sum_k d/dx sum_b loss_fn(z_k, y)_b``.

    The same estimator as ``eot`` separate calls each differentiating its own loss (the
    gradient of the mean loss, not of the loss of the mean logits), with the draws stacked
    along the batch in chunks of at most ``max_batch`` images; each chunk's graph is freed
    before the next. ``x`` may be a non-leaf (it is detached here).
    """
    B = x.shape[0]
    per_chunk = max(1, min(eot, max_batch // max(B, 1)))
    xin = x.detach().clone().requires_grad_(True)
    grad = torch.zeros_like(xin)
    chunks = []
    done = 0
    with torch.enable_grad():
        while done < eot:
            k = min(per_chunk, eot - done)
            logits = model(_stacked(xin, k))
            obj = loss_fn(logits, _stacked(y, k)).sum() / eot
            grad += torch.autograd.grad(obj, xin)[0]
            chunks.append(logits.detach().view(k, B, -1))
            done += k
    return torch.cat(chunks, 0), grad


class AttackedFunction(torch.nn.Module):
    """A logits function as an attack's model (the ``AttackedModel`` protocol).

    For running registered attacks outside a job (trainers, notebooks, tests): ``fn`` maps
    [0,1] images to logits; a stochastic ``fn`` draws fresh noise per call, and
    ``eot_samples`` of them are averaged per gradient.
    """

    def __init__(self, fn: Model, *, stochastic: bool = False, eot_samples: int = 1, eot_reduce: str = "loss", max_forward: int = 1024):
        super().__init__()
        self.fn = fn
        self.eval()  # an attacked model is evaluated, never trained
        self.stochastic, self.eot_samples, self.eot_reduce, self.max_forward = stochastic, eot_samples, eot_reduce, max_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def eot(self, x: torch.Tensor, y: torch.Tensor, *, loss: str, need_grad: bool):
        """EOT-averaged logits, margin and (if ``need_grad``) gradient of the mean loss."""
        return eot_forward(
            self, x, y, eot=self.eot_samples, reduce=self.eot_reduce, loss=loss, max_batch=self.max_forward, need_grad=need_grad
        )
