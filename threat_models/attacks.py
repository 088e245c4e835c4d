"""Attacks: PGD with batched EOT, APGD / AutoAttack through pyautoattack, and R-draw scoring.

Every attack takes a ``model`` callable mapping [0,1] images to logits. For a
stochastic defense that callable draws fresh purification noise on every call from the
``torch.Generator`` it holds, so EOT samples stacked along the batch dimension are
independent draws.

Bookkeeping follows the strongest-attack rule: per example the attack keeps the iterate
with the largest margin ``max_{j != y} z_j - z_y`` of the EOT-averaged logits (a positive
margin means the attack believes the example is broken) across all iterations and
restarts, and records after every iteration the fraction of examples not yet broken
(the convergence curve). The returned adversarial examples are then re-scored by the
engine with R fresh purifications that the attack never saw.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # (B, C, H, W) inside the eps-ball and [0, 1]
    margin: torch.Tensor  # (B,) best margin found (> 0: broken under the attack's own estimate)
    curve: list[int] = field(default_factory=list)  # robust count after each iteration (0 = start)


# --------------------------------------------------------------------------- geometry
def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _eps(eps, x: torch.Tensor):
    """A float, or a per-example (B,) tensor of budgets shaped to broadcast over x."""
    if isinstance(eps, torch.Tensor):
        return eps.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return eps


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps) -> torch.Tensor:
    """Project onto the eps-ball around ``x`` intersected with [0, 1] (eps: float or (B,))."""
    e = _eps(eps, x)
    delta = x_adv - x
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, torch.as_tensor(e, dtype=x.dtype, device=x.device)), -torch.as_tensor(e, dtype=x.dtype, device=x.device))
    else:
        n = _flat_norm(delta)
        delta = delta * torch.clamp(e / (n + 1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, norm: str, eps, generator: torch.Generator | None) -> torch.Tensor:
    gdev = generator.device if generator is not None else x.device
    e = _eps(eps, x)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        delta = (2 * u - 1) * e
    else:
        d = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        r = torch.rand((x.shape[0],), generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        delta = d / (_flat_norm(d) + 1e-12) * (e * r.view(-1, *([1] * (x.dim() - 1))))
    return project(x + delta, x, norm, eps)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - z_y


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AutoAttack's difference-of-logits-ratio loss (per example; higher = more adversarial)."""
    srt, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = (logits.argmax(1) == y).float()
    z_other = srt[:, -2] * top_is_y + srt[:, -1] * (1 - top_is_y)
    return -(z_y - z_other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "cw":
        return margin(logits, y)
    return dlr_loss(logits, y)


# --------------------------------------------------------------------------- EOT forward
def eot_forward(
    model: Model, x: torch.Tensor, y: torch.Tensor, *, eot: int, reduce: str, loss: str, max_batch: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """EOT-averaged logits, margin and (optionally) the gradient of the mean loss.

    The ``eot`` samples are stacked along the batch dimension (chunks of at most
    ``max_batch`` images) so one forward pass of the defended model draws them all.
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
            logits = model(xin.repeat(k, 1, 1, 1)).view(k, B, -1)
            if need_grad and reduce == "loss":
                # the mean of per-sample losses decomposes over chunks: free each chunk's graph
                obj = attack_loss(loss, logits.reshape(k * B, -1), y.repeat(k)).sum() / eot
                grad += torch.autograd.grad(obj, xin)[0]
                logits = logits.detach()
            chunks.append(logits)
            done += k
        mean_logits = torch.cat(chunks, 0).mean(0)
        if need_grad and reduce == "logits":
            # the loss of averaged logits does not decompose: one backward over all chunks
            grad = torch.autograd.grad(attack_loss(loss, mean_logits, y).sum(), xin)[0]
    mean_logits = mean_logits.detach()
    return mean_logits, margin(mean_logits, y), grad


# --------------------------------------------------------------------------- PGD
def pgd(
    model: Model,
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
    """Projected gradient descent with EOT, keeping the best iterate per example.

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
        (``curve[0]`` is the starting point), summed over restarts as "robust under every
        restart so far".
    """
    x = x.detach()
    best_x = x.clone()
    best_m = torch.full((x.shape[0],), float("-inf"), device=x.device)
    curve = [0] * (steps + 1)
    for r in range(restarts):
        xa = random_start(x, norm, eps, generator) if rand_start else x.clone()
        for it in range(steps + 1):
            need_grad = it < steps
            _, m, g = eot_forward(model, xa, y, eot=eot, reduce=eot_reduce, loss=loss, max_batch=max_batch, need_grad=need_grad)
            better = m > best_m
            best_m = torch.where(better, m, best_m)
            best_x[better] = xa[better]
            curve[it] = int((best_m <= 0).sum())
            if need_grad:
                if not torch.isfinite(g).all():
                    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                alpha = _eps(step_size, xa)
                if norm == "linf":
                    step = alpha * g.sign()
                else:
                    step = alpha * g / (_flat_norm(g) + 1e-12)
                xa = project(xa + step, x, norm, eps).detach()
            if progress is not None:
                progress()
    return AttackResult(x_adv=project(best_x, x, norm, eps), margin=best_m, curve=curve)


# --------------------------------------------------------------------------- AutoAttack
def _pyautoattack():
    import pyautoattack

    # robustbench imports `autoattack`; pyautoattack installs the module `pyautoattack`.
    sys.modules.setdefault("autoattack", pyautoattack)
    return pyautoattack


class _AsModule(torch.nn.Module):
    def __init__(self, fn: Model):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def apgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str,
    norm: str,
    eps: float,
    steps: int,
    eot: int,
    seed: int,
) -> AttackResult:
    """APGD-CE / APGD-DLR from pyautoattack (as in AutoAttack 'rand': 1 restart, EOT).

    pyautoattack's ``perturb`` returns the clean input for every example its single
    last forward pass did not misclassify; for stochastic defenses that discards the
    attack's work. We call ``attack_single_run`` and keep, per example, the
    misclassifying iterate if APGD found one, else its highest-loss iterate, and let the
    engine re-score it with fresh draws.
    """
    from pyautoattack.autopgd_base import APGDAttack

    _pyautoattack()
    net = _AsModule(model)
    att = APGDAttack(
        net, n_restarts=1, n_iter=steps, eps=eps, norm="Linf" if norm == "linf" else "L2",
        eot_iter=eot, rho=0.75, seed=seed, loss=loss, device=x.device, verbose=False,
    )
    att.init_hyperparam(x)
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
        torch.manual_seed(seed)
        x_best, acc, _loss_best, x_best_adv = att.attack_single_run(x.detach().clone(), y.clone())
    broken = acc == 0
    x_adv = torch.where(broken.view(-1, *([1] * (x.dim() - 1))), x_best_adv, x_best)
    with torch.no_grad():
        m = margin(model(x_adv), y)
    return AttackResult(x_adv=project(x_adv.detach(), x, norm, eps), margin=m, curve=[])


def autoattack_standard(model: Model, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int) -> AttackResult:
    """AutoAttack 'standard' (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack."""
    pa = _pyautoattack()
    aa = pa.AutoAttack(_AsModule(model), norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard", seed=seed, device=x.device)
    aa.verbose = False
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
        torch.manual_seed(seed)
        x_adv, _ = aa.run_standard_evaluation(x.detach().clone(), y.clone(), batch_size=x.shape[0])
    with torch.no_grad():
        m = margin(model(x_adv), y)
    return AttackResult(x_adv=project(x_adv.detach(), x, norm, eps), margin=m, curve=[])


# --------------------------------------------------------------------------- scoring
@torch.no_grad()
def predict_draws(model: Model, x: torch.Tensor, draws: int, max_batch: int = 1024) -> torch.Tensor:
    """(B, draws) predicted labels from ``draws`` independent defended forward passes."""
    B = x.shape[0]
    per_chunk = max(1, min(draws, max_batch // max(B, 1)))
    out = []
    done = 0
    while done < draws:
        k = min(per_chunk, draws - done)
        logits = model(x.repeat(k, 1, 1, 1)).view(k, B, -1)
        out.append(logits.argmax(-1))
        done += k
    return torch.cat(out, 0).T.contiguous()


def score_draws(preds: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example correctness under the three rules, from (B, R) predictions.

    - ``single``: the first draw is correct (protocol P1);
    - ``majority``: the true class is the strict plurality of the R draws (P2; a tie
      with another class counts as wrong);
    - ``worst``: every one of the R draws is correct (worst-of-R, P3-style).
    """
    correct = preds == y[:, None]
    n_classes = int(max(preds.max().item(), y.max().item())) + 1
    counts = torch.zeros(preds.shape[0], n_classes, dtype=torch.long, device=preds.device)
    counts.scatter_add_(1, preds, torch.ones_like(preds))
    c_true = counts.gather(1, y[:, None]).squeeze(1)
    counts.scatter_(1, y[:, None], -1)
    majority = c_true > counts.max(1).values
    return {"single": correct[:, 0], "majority": majority, "worst": correct.all(1)}
