"""Targeted FAB (Croce & Hein 2020; AutoAttack-standard's third attack), from pyautoattack.

FAB is a minimum-norm attack: it returns the smallest adversarial perturbation it finds
within the budget, and the clean input where it finds none. It has no EOT, so it is
refused against stochastic models (use autoattack-rand there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.core.attack import Attack, AttackConfig, AttackResult, register_attack
from threat_models.attacks._pyautoattack import AsModule, final_margin, pyautoattack, seeded


@dataclass(frozen=True)
class FABTConfig(AttackConfig):
    """Options of targeted FAB (``--set fab-t.KEY=VALUE``)."""

    n_target_classes: int = field(default=9, metadata={"help": "target classes tried (capped at classes - 1)"})
    alpha_max: float = field(default=0.1, metadata={"help": "FAB alpha_max"})
    eta: float = field(default=1.05, metadata={"help": "FAB overshooting"})
    beta: float = field(default=0.9, metadata={"help": "FAB backward step"})


@register_attack("fab-t")
class FABT(Attack):
    """FAB-T: apgd_steps iterations per target class, 1 restart (AutoAttack-standard's settings)."""

    description = "targeted FAB (pyautoattack), minimum-norm, apgd_steps iterations x n_target_classes; no EOT"
    Config = FABTConfig
    eot = "none"
    minimum_norm = True

    def ticks(self) -> int:
        return self.spec.apgd_steps * self.config.n_target_classes

    def run(self, model, x, y, budget, rng, progress):
        pyautoattack()
        from pyautoattack.fab_pt import FABAttack_PT

        x = x.detach()
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        c = self.config
        fab = FABAttack_PT(
            AsModule(model), n_restarts=1, n_iter=self.spec.apgd_steps, eps=budget.scalar_eps(), seed=rng.seed,
            norm=budget.geometry.library_name, verbose=False, device=x.device, targeted=True,
            n_target_classes=min(c.n_target_classes, n_classes - 1), alpha_max=c.alpha_max, eta=c.eta, beta=c.beta,
        )
        with seeded(rng.seed, x.device):
            adv = fab.perturb(x.clone(), y.clone())
        x_adv = budget.project(adv.detach(), x)
        progress(self.ticks())
        return AttackResult(x_adv=x_adv, margin=final_margin(model, x_adv, y), curve=[])
