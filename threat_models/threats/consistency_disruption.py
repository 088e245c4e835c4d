"""Consistency disruption (CMAP's attack, spec section 3.6): adversarial optimisation of the latents.

For defenses that provide a latent generator (CMAP); refused, with the reason, for every
other defense. One attack, ``consistency-disruption``, judged by protocol P4 (any of the
N candidates misclassified by the full defense with fresh latents), then re-scored
with R fresh purifications. The attack's own steps and gamma are attack options
(``--set consistency-disruption.gamma=100``). On the digit datasets and CIFAR the attack
takes 30 steps by default (a CPU budget).
"""

from threat_models.specs import L2_EPS, ThreatModel, family_defaults, register_threat

_CPU = {"attack_options": ("consistency-disruption.steps=30", "consistency-disruption.eval_every=10")}

register_threat(
    ThreatModel(
        name="consistency-disruption",
        description="CMAP's consistency-disruption attack: Adam on the defense's latents against the classifier (P4 any-of-N)",
        base=dict(attacks=("consistency-disruption",), gradient_path="auto", eot_samples=1, eval_draws=10, scoring="worst"),
        per_family=family_defaults({fam: dict(_CPU) for fam in ("digits", "mnist", "cifar")}),
        l2_eps=L2_EPS,
    )
)
