"""APGD on the DLR loss (AutoAttack-rand's second attack), from pyautoattack."""

from harness.core.attack import register_attack
from threat_models.attacks._apgd import APGDBase


@register_attack("apgd-dlr")
class APGDDLR(APGDBase):
    """APGD-DLR: apgd_steps iterations, 1 restart; EOT batched (one stacked call per gradient)."""

    description = "APGD on the DLR loss (pyautoattack), apgd_steps iterations, 1 restart, batched EOT"
    apgd_loss = "dlr"
