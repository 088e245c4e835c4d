"""APGD (Croce & Hein 2020) from pyautoattack, untargeted: the shared body of apgd-ce and apgd-dlr."""

from __future__ import annotations

from harness.core.attack import Attack, AttackResult
from threat_models.attacks._pyautoattack import AsModule, final_margin, pyautoattack, seeded, where_broken


class APGDBase(Attack):
    """One APGD run (1 restart, ``apgd_steps`` iterations, rho 0.75) on loss ``apgd_loss``.

    For a stochastic model pyautoattack averages ``eot_samples`` gradients per iteration
    (AutoAttack's ``rand`` version), one forward and backward pass per sample.
    """

    apgd_loss = "ce"
    eot = "looped"

    def ticks(self) -> int:
        return self.spec.apgd_steps

    def run(self, model, x, y, budget, rng, progress):
        pyautoattack()
        from pyautoattack.autopgd_base import APGDAttack

        att = APGDAttack(
            AsModule(model), n_restarts=1, n_iter=self.spec.apgd_steps, eps=budget.scalar_eps(),
            norm=budget.geometry.library_name, eot_iter=model.eot_samples, rho=0.75, seed=rng.seed,
            loss=self.apgd_loss, device=x.device, verbose=False,
        )
        att.init_hyperparam(x)
        with seeded(rng.seed, x.device):
            x_best, acc, _loss_best, x_best_adv = att.attack_single_run(x.detach().clone(), y.clone())
        x_adv = where_broken(acc == 0, x_best_adv, x_best)
        m = final_margin(model, x_adv, y)
        progress(self.ticks())
        return AttackResult(x_adv=budget.project(x_adv.detach(), x), margin=m, curve=[])
