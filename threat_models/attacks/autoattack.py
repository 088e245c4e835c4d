"""AutoAttack's versions (Croce & Hein 2020) as suites of registered attacks.

- ``autoattack-standard``: APGD-CE, APGD-T, FAB-T, Square, for deterministic models
  (FAB-T and Square have no EOT, so against a stochastic model the suite is refused).
- ``autoattack-rand``: APGD-CE and APGD-DLR with EOT (AutoAttack's ``rand`` version).
- ``autoattack``: standard against a deterministic model, rand against a stochastic one,
  decided by the attacked model's declared randomness (what ``adaptive`` uses).

The engine runs a suite's members in order with AutoAttack's cascade (a later attack
only on the examples still robust) and the per-example minimum over all of them.
"""

from harness.core.attack import AttackSuite, register_suite

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")

register_suite(AttackSuite("autoattack-standard", "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (deterministic models)", STANDARD))
register_suite(AttackSuite("autoattack-rand", "AutoAttack rand: APGD-CE, APGD-DLR with EOT", RAND))
register_suite(
    AttackSuite(
        "autoattack", "AutoAttack, chosen by the model: standard if deterministic, rand if stochastic", STANDARD, stochastic=RAND
    )
)
