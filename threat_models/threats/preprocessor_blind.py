"""Preprocessor-blind (non-adaptive): the attacker ignores the purifier (spec section 3.2).

PGD on the classifier alone, then purify and classify R times. Its adversarial
examples do not depend on the defense, so they are computed once per cell and reused
by every defense (the store's adversarial cache). ``--set attacks=cw-l2 --set norm=l2``
gives FlowPure's CW protocol, ``--set attacks=autoattack`` MAEP's AutoAttack-standard.
"""

from threat_models.specs import L2_EPS, ThreatModel, family_defaults, register_threat

PREPROCESSOR_BLIND = register_threat(
    ThreatModel(
        name="preprocessor-blind",
        description="PGD on the classifier alone (the attacker ignores the purifier); then purify and classify R times",
        base=dict(
            attacks=("pgd",), steps=10, step_size=2 / 255, random_start=True, gradient_path="classifier",
            eot_samples=1, eval_draws=10, scoring="worst",
        ),
        per_family=family_defaults({"digits": {"steps": 20}, "mnist": {"steps": 20}}),
        l2_eps=L2_EPS,
    )
)
