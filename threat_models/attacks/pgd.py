"""PGD with batched EOT, keeping the best iterate per example (Madry et al.; Lee & Kim's PGD-EOT).

Per example the attack keeps the iterate with the largest margin ``max_{j != y} z_j - z_y``
of the EOT-averaged logits across all iterations and restarts, and records after every
iteration how many examples are not yet broken (the convergence curve). Written here
rather than taken from torchattacks: torchattacks' PGD returns the last iterate, has no
EOT batching along the batch dimension, no logit-averaging EOT, no per-example budgets
and no curve.
"""

from __future__ import annotations

from typing import Callable

import torch

from harness.core.attack import Attack, AttackResult, register_attack
from threat_models.eot import eot_forward
from threat_models.norms import NORMS, broadcast_eps


def pgd(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps,
    steps: int,
    step_size,
    restarts: int = 1,
    rand_start: bool = True,
    loss: str = "ce",
    eot: int = 1,
    eot_reduce: str = "loss",
    generator: torch.Generator | None = None,
    max_batch: int = 1024,
    progress: Callable[[], None] | None = None,
) -> AttackResult:
    """Projected gradient ascent with EOT, keeping the best iterate per example.

    Args:
        model: [0,1] images -> logits (stochastic models draw fresh noise per call).
        norm, eps: threat geometry; ``eps`` and ``step_size`` may be floats or per-example
            (B,) tensors (training data with random budgets). ``step_size`` is a sign step
            (linf) or a step along the l2-normalised gradient (l2).
        restarts: independent runs; the best iterate over all of them is kept.
        rand_start: start uniformly in the ball (drawn from ``generator``).
        eot: gradient samples per step, batched along the batch dimension.

    Returns:
        AttackResult with ``curve[i]`` = examples still robust after iteration i
        (``curve[0]`` is the starting point), as "robust under every restart so far".
    """
    geo = NORMS.get(norm)
    x = x.detach()
    best_x = x.clone()
    best_m = torch.full((x.shape[0],), float("-inf"), device=x.device)
    curve = [0] * (steps + 1)
    for _ in range(restarts):
        xa = geo.random_start(x, eps, generator) if rand_start else x.clone()
        for it in range(steps + 1):
            need_grad = it < steps
            _, m, g = eot_forward(model, xa, y, eot=eot, reduce=eot_reduce, loss=loss, max_batch=max_batch, need_grad=need_grad)
            better = m > best_m
            best_m = torch.where(better, m, best_m)
            best_x[better] = xa[better]
            curve[it] = int((best_m <= 0).sum())
            if need_grad:
                step = geo.ascent_step(g, broadcast_eps(step_size, xa))
                xa = geo.project(xa + step, x, eps).detach()
            if progress is not None:
                progress()
    return AttackResult(x_adv=geo.project(best_x, x, eps), margin=best_m, curve=curve)


@register_attack("pgd")
class PGD(Attack):
    """PGD with batched EOT and the best iterate kept (steps, step_size, restarts, random_start, loss)."""

    description = "PGD with EOT stacked along the batch; best iterate per example; steps/step_size/restarts/random_start/loss"
    eot = "batched"

    def ticks(self) -> int:
        return (self.spec.steps + 1) * self.spec.restarts

    def run(self, model, x, y, budget, rng, progress):
        s = self.spec
        return pgd(
            model, x, y, norm=budget.norm, eps=budget.eps, steps=s.steps, step_size=s.step_size, restarts=s.restarts,
            rand_start=s.random_start, loss=s.loss, eot=model.eot_samples, eot_reduce=model.eot_reduce,
            generator=rng.generator, max_batch=model.max_forward, progress=lambda: progress(1),
        )
