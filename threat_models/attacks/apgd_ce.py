"""APGD on the cross-entropy loss (AutoAttack's first attack), from pyautoattack."""

from harness.core.attack import register_attack
from threat_models.attacks._apgd import APGDBase


@register_attack("apgd-ce")
class APGDCE(APGDBase):
    """APGD-CE: apgd_steps iterations, 1 restart; EOT batched (one stacked call per gradient)."""

    description = "APGD on cross-entropy (pyautoattack), apgd_steps iterations, 1 restart, batched EOT"
    apgd_loss = "ce"
