"""Carlini-Wagner l_2 with a binary search over the constant (FlowPure's preprocessor-blind CW, spec 3.2).

The optimisation (Adam on w with x' = (tanh(w) + 1) / 2, the best misclassified iterate of
smallest l_2 kept, early abort) is torchattacks' ``CW``; this adapter adds what
torchattacks leaves out and foolbox's ``L2CarliniWagnerAttack`` (FlowPure's attack)
does: the binary search over the constant c per example (start 1e-3, times 10 until
an adversarial is found, then bisection; 9 searches of 50 steps, lr 0.01, confidence
0). Two of torchattacks' functions are replaced because they are wrong for this job:

- its margin ``f`` takes ``max((1 - onehot) * z)``, which counts the true class as 0
  (wrong whenever every other logit is negative); here it is ``max_{j != y} z_j``,
  multiplied by each example's own constant;
- its ``inverse_tanh_space`` maps pixels at exactly 0 or 1 to infinity, where the tanh
  gradient vanishes, so they can never move (half of an 8x8 digit is 0); here the
  input is shrunk by 1e-6 first, as foolbox does.

An example counts as broken when its smallest adversarial found has l_2 at most the
budget eps; the returned example is that adversarial projected onto the eps-ball
("the clipped adversarial", as foolbox returns it), or the clean input if none was
found. CW is a minimum-norm attack without EOT, refused against stochastic models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.core.attack import Attack, AttackConfig, AttackResult, register_attack
from threat_models.attacks._pyautoattack import AsModule, final_margin


@dataclass(frozen=True)
class CWConfig(AttackConfig):
    """Options of Carlini-Wagner L2 (``--set cw-l2.KEY=VALUE``)."""

    steps: int = field(default=50, metadata={"help": "Adam steps per binary-search step (foolbox: 50)"})
    search_steps: int = field(default=9, metadata={"help": "binary-search steps over the constant (foolbox: 9)"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate (foolbox stepsize 0.01)"})
    initial_const: float = field(default=1e-3, metadata={"help": "first constant c (foolbox: 1e-3)"})
    confidence: float = field(default=0.0, metadata={"help": "margin kappa required (foolbox: 0)"})

    def __post_init__(self):
        if self.steps < 1 or self.search_steps < 1:
            raise ValueError("steps and search_steps must be >= 1")
        if self.lr <= 0 or self.initial_const <= 0 or self.confidence < 0:
            raise ValueError("lr and initial_const must be > 0, confidence >= 0")


def _torchattacks_cw():
    import torchattacks

    class PerExampleCW(torchattacks.CW):
        """torchattacks' CW with a per-example constant and the two fixes above."""

        consts: torch.Tensor

        def f(self, outputs, labels):
            z_y = outputs.gather(1, labels[:, None]).squeeze(1)
            other = outputs.scatter(1, labels[:, None], float("-inf")).max(1).values
            return self.consts * torch.clamp(z_y - other, min=-self.kappa)

        def inverse_tanh_space(self, x):
            return self.atanh(torch.clamp(x * 2 - 1, min=-1, max=1) * (1 - 1e-6))

    return PerExampleCW


@register_attack("cw-l2")
class CWL2(Attack):
    """CW-l2 (torchattacks' optimiser, foolbox's binary search): search_steps x steps Adam steps."""

    description = "Carlini-Wagner l2 (torchattacks) with foolbox's binary search over c; minimum-norm, clipped to eps"
    Config = CWConfig
    norms = frozenset({"l2"})
    eot = "none"
    minimum_norm = True

    def ticks(self) -> int:
        return self.config.steps * self.config.search_steps

    def run(self, model, x, y, budget, rng, progress):
        cfg = self.config
        x = x.detach()
        B = x.shape[0]
        # eval() first: torchattacks restores the wrapper's training flag after every call, and a
        # fresh module is in training mode, which would switch the classifier's BatchNorm to batch statistics
        net = AsModule(model).eval()
        atk = _torchattacks_cw()(net, c=1.0, kappa=cfg.confidence, steps=cfg.steps, lr=cfg.lr)
        atk.set_device(x.device)
        consts = torch.full((B,), cfg.initial_const, device=x.device)
        lower = torch.zeros(B, device=x.device)
        upper = torch.full((B,), float("inf"), device=x.device)
        best, best_d = x.clone(), torch.full((B,), float("inf"), device=x.device)
        for _ in range(cfg.search_steps):
            atk.consts = consts
            adv = atk(x, y).detach()
            with torch.no_grad():
                success = model(adv).argmax(1) != y
            d = (adv - x).flatten(1).norm(dim=1)
            improve = success & (d < best_d)
            best[improve], best_d[improve] = adv[improve], d[improve]
            upper = torch.where(success, torch.minimum(upper, consts), upper)
            lower = torch.where(success, lower, torch.maximum(lower, consts))
            consts = torch.where(torch.isinf(upper), consts * 10, (lower + upper) / 2)
            progress(cfg.steps)
        x_adv = budget.project(best, x)
        return AttackResult(x_adv=x_adv, margin=final_margin(model, x_adv, y), curve=[])
