"""The contracts every plugin is written against, and the plumbing they share.

Plugin authors import from here::

    from harness.core import Defense, DefenseConfig, GradientPath, register_defense, randn_like
    from harness.core import Attack, AttackConfig, AttackResult, register_attack
    from harness.core import Shift, ShiftConfig, register_shift
    from harness.core import ThreatModel, register_threat          # a threat template (threat_models.specs)

- :mod:`harness.core.registry`: name -> plugin registries, ``HarnessError``, ``MissingFileError``.
- :mod:`harness.core.config`: frozen-dataclass configs from plain values.
- :mod:`harness.core.defense`, :mod:`harness.core.attack`, :mod:`harness.core.shift`:
  the three plugin contracts.
- :mod:`harness.core.env`: package versions, source hashes, machine facts.
- :mod:`harness.core.plugins`: loading built-in and user plugins.
- ``ThreatModel``, ``ThreatSpec``, ``register_threat``: re-exported from :mod:`threat_models.specs`
  (threat templates are data, defined beside the attacks they compose).
"""

import importlib

#: name -> submodule that defines it. Imported on first use (PEP 562), so that importing
#: ``harness.core.registry`` (every CLI command does) does not import torch. A dotted value
#: is a module outside ``harness.core`` whose name is re-exported here.
_WHERE = {
    **dict.fromkeys(
        ("ATTACKS", "SUITES", "Attack", "AttackConfig", "AttackRandomness", "AttackResult", "AttackSuite", "Budget",
         "register_attack", "register_suite"), "attack"),
    **dict.fromkeys(
        ("DEFENSES", "CostLevel", "Defense", "DefenseConfig", "GradientPath", "SetupContext", "bpda", "randn_like",
         "register_defense"), "defense"),
    **dict.fromkeys(("HarnessError", "MissingFileError", "Registry"), "registry"),
    **dict.fromkeys(("SHIFTS", "Shift", "ShiftConfig", "ShiftContext", "register_shift"), "shift"),
    **dict.fromkeys(("THREATS", "ThreatModel", "ThreatSpec", "register_threat"), "threat_models.specs"),
}


def _module(name: str) -> str:
    """The module that defines the exported ``name``."""
    where = _WHERE[name]
    return where if "." in where else f"harness.core.{where}"


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_module(name)), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness.core' has no attribute '{name}'")


__all__ = [
    "ATTACKS", "DEFENSES", "SHIFTS", "SUITES", "Attack", "AttackConfig", "AttackRandomness", "AttackResult",
    "AttackSuite", "Budget", "CostLevel", "Defense", "DefenseConfig", "GradientPath", "HarnessError", "MissingFileError",
    "Registry",
    "SetupContext", "Shift", "ShiftConfig", "ShiftContext", "THREATS", "ThreatModel", "ThreatSpec", "bpda", "randn_like",
    "register_attack", "register_defense", "register_shift", "register_suite", "register_threat",
]
