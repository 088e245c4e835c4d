"""APGD (Croce & Hein 2020) from pyautoattack, untargeted: the shared body of apgd-ce and apgd-dlr."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core.attack import Attack, AttackConfig, AttackResult
from threat_models.attacks._pyautoattack import eot_model, final_margin, pyautoattack, seeded, where_broken


@dataclass(frozen=True)
class APGDConfig(AttackConfig):
    eot_batch: bool = field(
        default=True, metadata={"help": "EOT draws stacked along the batch in one call (false: pyautoattack's own loop)"}
    )


class APGDBase(Attack):
    """One APGD run (1 restart, ``apgd_steps`` iterations, rho 0.75) on loss ``apgd_loss``.

    For a stochastic model every gradient averages ``eot_samples`` per-draw loss gradients
    (AutoAttack's ``rand`` version): stacked along the batch in one call by default
    (:class:`~threat_models.attacks._pyautoattack.BatchedEOT`), or pyautoattack's loop of
    one forward and backward pass per draw with ``eot_batch=false``.
    """

    Config = APGDConfig
    apgd_loss = "ce"
    eot = "batched"

    def ticks(self) -> int:
        return self.spec.apgd_steps

    def run(self, model, x, y, budget, rng, progress):
        pyautoattack()
        from pyautoattack.autopgd_base import APGDAttack

        module, eot_iter = eot_model(model, self.config.eot_batch)
        att = APGDAttack(
            module, n_restarts=1, n_iter=self.spec.apgd_steps, eps=budget.scalar_eps(),
            norm=budget.geometry.library_name, eot_iter=eot_iter, rho=0.75, seed=rng.seed,
            loss=self.apgd_loss, device=x.device, verbose=False,
        )
        if hasattr(module, "bind"):
            module.bind(att, y)
        att.init_hyperparam(x)
        with seeded(rng.seed, x.device):
            x_best, acc, _loss_best, x_best_adv = att.attack_single_run(x.detach().clone(), y.clone())
        x_adv = where_broken(acc == 0, x_best_adv, x_best)
        m = final_margin(model, x_adv, y)
        progress(self.ticks())
        return AttackResult(x_adv=budget.project(x_adv.detach(), x), margin=m, curve=[])
