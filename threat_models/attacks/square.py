"""Square Attack (Andriushchenko et al. 2020; AutoAttack-standard's fourth attack), from pyautoattack.

A score-based random search that needs no gradient, so gradient masking cannot hide a
defense from it. Every example keeps the search's best point (on the budget's boundary),
also where the search does not succeed. No EOT: refused against stochastic models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core.attack import Attack, AttackConfig, AttackResult, register_attack
from threat_models.attacks._pyautoattack import AsModule, final_margin, pyautoattack, seeded


@dataclass(frozen=True)
class SquareConfig(AttackConfig):
    """Options of the Square attack (``--set square.KEY=VALUE``)."""

    n_queries: int = field(default=5000, metadata={"help": "queries per example (AutoAttack: 5000)"})
    p_init: float = field(default=0.8, metadata={"help": "initial fraction of pixels changed per square"})

    def __post_init__(self):
        if self.n_queries < 1:
            raise ValueError(f"n_queries={self.n_queries} must be >= 1")


@register_attack("square")
class Square(Attack):
    """Square Attack: n_queries score queries, 1 restart, margin loss."""

    description = "Square Attack (pyautoattack): gradient-free random search, n_queries queries; no EOT"
    Config = SquareConfig
    needs_gradients = False
    eot = "none"

    def ticks(self) -> int:
        return self.config.n_queries

    def run(self, model, x, y, budget, rng, progress):
        pyautoattack()
        from pyautoattack.square import SquareAttack

        sq = SquareAttack(
            AsModule(model), p_init=self.config.p_init, n_queries=self.config.n_queries, eps=budget.scalar_eps(),
            norm=budget.geometry.library_name, n_restarts=1, seed=rng.seed, verbose=False, device=x.device,
            resc_schedule=False,
        )
        sq.init_hyperparam(x)
        with seeded(rng.seed, x.device):
            _queries, x_best = sq.attack_single_run(x.detach().clone(), y.clone())
        x_adv = budget.project(x_best.detach(), x)
        progress(self.ticks())
        return AttackResult(x_adv=x_adv, margin=final_margin(model, x_adv, y), curve=[])
