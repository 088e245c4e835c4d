"""Targeted APGD on the targeted DLR loss (AutoAttack-standard's second attack), from pyautoattack.

The loop over target classes is pyautoattack's (``APGDAttack_targeted.perturb``: the
k-th most likely class of the still-robust examples, k = 2 .. n_target_classes + 1, one
restart each), written here so that an example no target breaks keeps its best iterate
(the one with the largest margin over all targets) instead of the clean input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.core.attack import Attack, AttackConfig, AttackResult, register_attack
from threat_models.attacks._pyautoattack import eot_model, final_margin, pyautoattack, seeded, where_broken
from threat_models.losses import margin


@dataclass(frozen=True)
class APGDTConfig(AttackConfig):
    """Options of targeted APGD (``--set apgd-t.KEY=VALUE``)."""

    n_target_classes: int = field(default=9, metadata={"help": "target classes tried (capped at classes - 1)"})
    eot_batch: bool = field(
        default=True, metadata={"help": "EOT draws stacked along the batch in one call (false: pyautoattack's own loop)"}
    )

    def __post_init__(self):
        if self.n_target_classes < 1:
            raise ValueError(f"n_target_classes={self.n_target_classes} must be >= 1")


@register_attack("apgd-t")
class APGDT(Attack):
    """APGD-T: apgd_steps iterations per target class, 1 restart each; EOT batched (``eot_batch``)."""

    description = "targeted APGD (DLR-targeted, pyautoattack), apgd_steps iterations x n_target_classes targets"
    Config = APGDTConfig
    eot = "batched"

    def ticks(self) -> int:
        return self.spec.apgd_steps * self.config.n_target_classes

    def run(self, model, x, y, budget, rng, progress):
        pyautoattack()
        from pyautoattack.autopgd_base import APGDAttack_targeted

        x = x.detach()
        with torch.no_grad():
            logits0 = model(x)
        n_t = min(self.config.n_target_classes, logits0.shape[1] - 1)
        module, eot_iter = eot_model(model, self.config.eot_batch)
        att = APGDAttack_targeted(
            module, n_restarts=1, n_iter=self.spec.apgd_steps, eps=budget.scalar_eps(),
            norm=budget.geometry.library_name, eot_iter=eot_iter, rho=0.75, seed=rng.seed,
            n_target_classes=n_t, device=x.device, verbose=False,
        )
        att.init_hyperparam(x)
        best_x, best_m = x.clone(), margin(logits0, y)
        broken = best_m > 0
        done = 0
        with seeded(rng.seed, x.device):
            for target_class in range(2, n_t + 2):
                idx = torch.nonzero(~broken).flatten()
                if len(idx) == 0:
                    break
                done += 1
                xs, ys = x[idx], y[idx]
                with torch.no_grad():
                    att.y_target = model(xs).sort(dim=1)[1][:, -target_class]
                if hasattr(module, "bind"):
                    module.bind(att, ys)
                x_b, acc, _loss, x_b_adv = att.attack_single_run(xs, ys)
                success = acc == 0
                cand = where_broken(success, x_b_adv, x_b)
                m = final_margin(model, cand, ys)
                better = success | (m > best_m[idx])
                best_x[idx[better]] = cand[better]
                best_m[idx[better]] = m[better]
                broken[idx[success]] = True
                progress(self.spec.apgd_steps)
        progress(self.ticks() - done * self.spec.apgd_steps)  # target classes not needed: every example broken
        return AttackResult(x_adv=budget.project(best_x, x), margin=best_m, curve=[])
