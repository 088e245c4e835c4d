"""Attacks, one module each (registered in ``harness.core.attack.ATTACKS`` on import).

``pgd`` is the project's own PGD with batched EOT; ``apgd-ce``, ``apgd-dlr``,
``apgd-t``, ``fab-t`` and ``square`` are thin adapters over pyautoattack; ``cw-l2`` is
an adapter over torchattacks' CW with the binary search over the constant; ``diffhammer``
is the project's DiffHammer (with the ``diffhammer-stochastic`` suite).
``autoattack.py`` composes them into AutoAttack's suites.
"""

from __future__ import annotations

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
