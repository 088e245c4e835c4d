"""APGD on the cross-entropy loss (AutoAttack's first attack), from pyautoattack."""

from harness.core.attack import register_attack
from threat_models.attacks._apgd import APGDBase


@register_attack("apgd-ce")
class APGDCE(APGDBase):
    """APGD-CE: apgd_steps iterations, 1 restart; EOT looped by pyautoattack."""

    description = "APGD on cross-entropy (pyautoattack), apgd_steps iterations, 1 restart, looped EOT"
    apgd_loss = "ce"
