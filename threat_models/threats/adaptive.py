"""Fully adaptive white-box (spec section 3.4): the strongest gradient the defense declares.

PGD-EOT (Lee & Kim: 200 steps of 0.007, EOT 20, no random start) and AutoAttack
through the defense's strongest gradient path, then the same attacks again through
BPDA on the examples that survive (``also_paths``; the exact gradient is not always the
strongest). The ``autoattack`` suite is AutoAttack-standard (APGD-CE, APGD-T, FAB-T,
Square) against a deterministic defense and AutoAttack-rand (APGD-CE, APGD-DLR with
EOT) against a stochastic one, chosen from the defense's declared ``stochastic``.
Against a stochastic defense DiffHammer runs as well (the ``diffhammer-stochastic`` suite,
empty for a deterministic one): it is the spec's recommended attack on FlowPure-Gauss, and
the cell is the per-example minimum, so adding it can only lower robust accuracy. On the
digit datasets and CIFAR it runs 10 iterations per restart (a CPU budget) with the spec's 10
evaluation draws.

The digit datasets and CIFAR take a CPU budget by default (PGD-40, EOT 4, APGD 40 iterations,
Square 1000 queries, DiffHammer 10 iterations): an adaptive CIFAR cell through a diffusion
purifier at the papers' budget (PGD-200 with EOT 20, AutoAttack-rand with EOT 20) takes days of
CPU. The papers' protocol is one ``--set`` away (``steps=200 eot_samples=20 apgd_steps=100
square.n_queries=5000 diffhammer.n_iter=50``), as
``grids/paper-cifar10-adaptive.yaml`` writes it.
"""

from threat_models.specs import L2_EPS, ThreatModel, family_defaults, register_threat

DIGITS_OPTIONS = ("square.n_queries=1000", "diffhammer.n_iter=10", "diffhammer.n_eval=10")

register_threat(
    ThreatModel(
        name="adaptive",
        description="fully adaptive white-box: PGD-EOT and AutoAttack (standard for deterministic defenses, rand plus "
        "DiffHammer for stochastic ones) through the strongest gradient, then again through BPDA on the survivors; "
        "per-example minimum",
        base=dict(
            attacks=("pgd", "autoattack", "diffhammer-stochastic"), steps=200, step_size=0.007, random_start=False,
            gradient_path="auto", also_paths=("bpda",), eot_samples=20, apgd_steps=100, eval_draws=10, scoring="worst",
        ),
        per_family=family_defaults(
            {
                "digits": {"steps": 40, "eot_samples": 4, "apgd_steps": 40, "attack_options": DIGITS_OPTIONS},
                "mnist": {"steps": 40, "eot_samples": 4, "apgd_steps": 40, "attack_options": DIGITS_OPTIONS},
                # CIFAR on a CPU (the shipped small purifiers): the digits budget; the papers' protocol is
                # steps=200 eot_samples=20 apgd_steps=100 and the attacks' own defaults (grids/paper-cifar10-adaptive.yaml)
                "cifar": {"steps": 40, "eot_samples": 4, "apgd_steps": 40, "attack_options": DIGITS_OPTIONS},
            }
        ),
        l2_eps=L2_EPS,
    )
)
