"""Colour shift (spec 3.7; MAEP Sections 5.3 and 5.6): the preprocessor-blind threat on shifted inputs.

Every clean input is first shifted (``--set shift=reinhard|brightness|contrast|saturate``,
``--set severity=K`` for the CIFAR-10-C corruptions, ``--set space=lab`` for Reinhard in
CIE L*a*b*; Reinhard by default), then attacked as under ``preprocessor-blind`` (PGD on
the classifier alone; any ``attacks`` / ``gradient_path`` may be set). The cell stores
clean and robust accuracy on the shifted inputs and, because ``paired_reference`` is on,
the same numbers on the unshifted inputs of the same examples (same attack seeds) and
for the undefended classifier, with the paired changes and their 95% Newcombe intervals
(``clean_accuracy_change``, ``robust_accuracy_change``, ``..._classifier_change``), so a
reader sees whether the purifier or the classifier loses the accuracy. A shift, not an
attack: the leaderboard shows it beside the worst case over the adversarial threats,
never inside it.
"""

import dataclasses

from threat_models.specs import register_threat
from threat_models.threats.preprocessor_blind import PREPROCESSOR_BLIND

register_threat(
    dataclasses.replace(
        PREPROCESSOR_BLIND,
        name="color-shift",
        description="colour shift (Reinhard transfer or CIFAR-10-C brightness/contrast/saturate), then the preprocessor-blind "
        "attack; paired with the unshifted inputs and the undefended classifier on the same examples",
        base={**PREPROCESSOR_BLIND.base, "shift": "reinhard", "paired_reference": True},
    )
)
