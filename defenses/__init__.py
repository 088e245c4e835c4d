"""Defense plugins: one module per defense, registered in ``harness.core.DEFENSES``.

Importing this package imports every module in it (registration happens at class
definition). Modules whose optional dependencies are missing are skipped with a
warning rather than breaking ``harness ls``.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name.startswith("_"):
        continue
    try:
        importlib.import_module(f"{__name__}.{_mod.name}")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        warnings.warn(f"defense module '{_mod.name}' not loaded: {exc}")
