"""Everything about the attacker: threat specs, threat templates, attacks, norms, shifts, scoring.

- ``specs.py``: :class:`ThreatSpec` (a resolved protocol) and :class:`ThreatModel` (a template).
- ``threats/``: one module per registered threat template.
- ``attacks/``: one module per registered attack; ``autoattack.py`` holds the suites.
- ``shifts/``: one module per registered input shift.
- ``norms.py``, ``losses.py``, ``eot.py``, ``scoring.py``: the geometry, losses, EOT
  batching and R-draw scoring the attacks and the engine share.

Importing this package registers every built-in threat, attack and shift.
"""

from threat_models import attacks, shifts, threats  # noqa: F401  (registration on import)
from threat_models.specs import THREATS, ThreatModel, ThreatSpec

__all__ = ["THREATS", "ThreatModel", "ThreatSpec"]
