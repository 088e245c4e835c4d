"""A user-written attack loaded as a plugin (``--plugin tests/plugins/toy_attack.py``).

FGSM (Goodfellow et al. 2015): one ascent step of the whole budget along the (EOT-averaged)
loss gradient: ``x + eps * sign(g)`` for l_inf, ``x + eps * g / ||g||_2`` for l_2.
It is written against the attack contract only (``harness.core``), as a user would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.core import Attack, AttackConfig, AttackResult, register_attack


@dataclass(frozen=True)
class FGSMConfig(AttackConfig):
    loss: str = field(default="ce", metadata={"help": "loss to ascend (ce, cw, dlr)"})


@register_attack("toy-fgsm")
class ToyFGSM(Attack):
    """FGSM: one full-budget step along the EOT-averaged gradient."""

    description = "FGSM, one step of size eps (a user plugin)"
    Config = FGSMConfig
    eot = "batched"

    def run(self, model, x, y, budget, rng, progress):
        _, _, g = model.eot(x, y, loss=self.config.loss, need_grad=True)
        x_adv = budget.project(x + budget.geometry.ascent_step(g, budget.eps), x)
        with torch.no_grad():
            _, m, _ = model.eot(x_adv, y, loss=self.config.loss, need_grad=False)
        progress(1)
        return AttackResult(x_adv=x_adv.detach(), margin=m, curve=[int((m <= 0).sum())])
