"""Cross-dataset transfer (spec 3.8; MAEP Tables 7-9): a purifier trained on A before B's classifier.

The purifier's training dataset is its ``trained_on`` option (every shipped purifier;
``--set trained_on=mnist5k``; unset = the evaluated dataset, so the diagonal of the
transfer matrix is the in-distribution cell). When A's images differ from B's in
resolution or channels, the defense's ``adapter`` maps them (resize to the purifier's
resolution and back, channel replication or averaging, MAEP's tiles), printed and
stored as a setup note. The attack is non-adaptive, as MAEP's: AutoAttack-standard on
the classifier alone (``attacks=autoattack`` under the classifier path is the standard
suite for every defense); ``--set attacks=pgd`` where it is too slow, recorded in the
spec. ``paired_reference`` scores the purifier trained on B on the same examples and
the same (shared) adversarial examples, so ``robust_accuracy_change`` is the paired cost
of the transfer, with its 95% Newcombe interval.
"""

import dataclasses

from threat_models.specs import register_threat
from threat_models.threats.preprocessor_blind import PREPROCESSOR_BLIND

#: AutoAttack's iteration counts on the CPU-scaled digit datasets (as the adaptive threat's).
_CPU_AA = {"apgd_steps": 40, "attack_options": ("square.n_queries=1000",)}
_CPU = ("digits", "mnist")

register_threat(
    dataclasses.replace(
        PREPROCESSOR_BLIND,
        name="cross-dataset",
        description="a purifier trained on another dataset (--set trained_on=A) before this dataset's classifier; "
        "AutoAttack-standard on the classifier alone; paired with the purifier trained on this dataset",
        base={**PREPROCESSOR_BLIND.base, "attacks": ("autoattack",), "paired_reference": True},
        per_family={fam: {**v, **(_CPU_AA if fam in _CPU else {})} for fam, v in PREPROCESSOR_BLIND.per_family.items()},
    )
)
