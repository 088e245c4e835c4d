"""Threat-model specs (``specs``) and the attacks that implement them (``attacks``)."""

from threat_models.specs import THREATS, ThreatModel, ThreatSpec

__all__ = ["THREATS", "ThreatModel", "ThreatSpec"]
