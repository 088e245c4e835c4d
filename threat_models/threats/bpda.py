"""BPDA+EOT (DiffPure / Hill et al., spec section 3.3a): purify forward, identity backward.

50 PGD steps of 2/255 without random start, logits averaged over 15 purifications per
gradient (DiffPure's ``eot_attack_ave='logits'``), R evaluation draws. On the digit
datasets and CIFAR the default is a CPU budget (20 steps, EOT 4); DiffPure's protocol is
``--set steps=50 eot_samples=15``, as ``grids/paper-cifar10.yaml`` writes it.
"""

from threat_models.specs import L2_EPS, ThreatModel, family_defaults, register_threat

register_threat(
    ThreatModel(
        name="bpda",
        description="BPDA+EOT (DiffPure/Hill et al.): purify forward, identity backward, logits averaged over EOT samples",
        base=dict(
            attacks=("pgd",), steps=50, step_size=2 / 255, random_start=False, gradient_path="bpda",
            eot_samples=15, eot_reduce="logits", eval_draws=10, scoring="worst",
        ),
        # CPU budgets on the digit datasets and CIFAR (the shipped small purifiers); DiffPure's BPDA+EOT is
        # --set steps=50 eot_samples=15 (grids/paper-cifar10.yaml)
        per_family=family_defaults({fam: {"steps": 20, "eot_samples": 4} for fam in ("digits", "mnist", "cifar")}),
        l2_eps=L2_EPS,
    )
)
