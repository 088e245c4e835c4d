"""The attack plan of a job: which registered attacks run, in which order, through which path.

A threat spec lists attacks and suites (``attacks``), a main gradient path
(``gradient_path``, ``auto`` = the defense's strongest) and further paths every attack
also runs through (``also_paths``). The plan expands suites by whether the attacked
model is stochastic, pins ``NAME@PATH`` entries to their path, and checks every
pairing against the declared capabilities, so a pair that cannot run is refused with
the reason before anything runs:

- the defense must declare the path;
- the attack must support the spec's norm;
- an attack without EOT (``eot = "none"``) cannot attack a stochastic model;
- an attack's ``requires`` must be among the defense's ``provides``.

Labels are the attack name on the main path and ``name@path`` on the others; the
examples table stores each example's predictions per label. Gradient-free attacks are
not repeated on further paths: their forward values are the same on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.attack import ATTACKS, SUITES, Attack
from harness.core.defense import CostLevel, Defense, GradientPath, parse_gradient_path
from harness.core.registry import HarnessError
from threat_models.specs import ThreatSpec, split_attack_entry


class IncompatibleError(HarnessError):
    """This (defense, threat) pair cannot run; the message is the reason."""


@dataclass(frozen=True)
class PlannedAttack:
    """One attack of a job's plan."""

    label: str  # "pgd", "apgd-ce@bpda": the key of its predictions and curve
    attack: Attack
    path: GradientPath
    suite: str | None = None  # the suite it came from, if any

    def record(self) -> dict:
        """JSON-able description (identity and job record)."""
        return {"label": self.label, "path": self.path.value, "suite": self.suite, "attack": self.attack.identity()}


@dataclass(frozen=True)
class AttackPlan:
    """The planned attacks in order, the main and further paths, and what the plan costs."""

    attacks: tuple[PlannedAttack, ...]
    main_path: GradientPath
    also_paths: tuple[GradientPath, ...]
    notes: tuple[str, ...] = ()

    @property
    def classifier_only(self) -> bool:
        """Every attack ignores the purifier (its adversarial examples are the same for every defense)."""
        return all(p.path is GradientPath.CLASSIFIER for p in self.attacks)

    def cost_level(self) -> CostLevel:
        """What the most expensive planned attack pays for per step (keys ``default_examples``)."""
        order = [CostLevel.CLASSIFIER, CostLevel.FORWARD, CostLevel.GRADIENT]

        def level(p: PlannedAttack) -> CostLevel:
            if p.attack.cost_level is not None:
                return CostLevel(p.attack.cost_level)
            if p.path in (GradientPath.FULL, GradientPath.ADJOINT, GradientPath.SURROGATE):
                return CostLevel.GRADIENT
            return CostLevel.CLASSIFIER if p.path is GradientPath.CLASSIFIER else CostLevel.FORWARD

        return max((level(p) for p in self.attacks), key=order.index, default=CostLevel.CLASSIFIER)

    def paths_label(self) -> str:
        """The stored gradient path: the main one, then the further ones (``full+bpda``)."""
        return "+".join([self.main_path.value] + [p.value for p in self.also_paths])

    def total_ticks(self) -> int:
        """Progress ticks of one batch."""
        return sum(p.attack.ticks() for p in self.attacks)


def main_path_for(defense_cls: type[Defense], spec: ThreatSpec) -> GradientPath:
    """The main gradient path of the pair, or IncompatibleError with the reason."""
    path = defense_cls.strongest_path() if spec.gradient_path == "auto" else parse_gradient_path(spec.gradient_path)
    _check_path(defense_cls, spec, path)
    return path


def _check_path(defense_cls: type[Defense], spec: ThreatSpec, path: GradientPath) -> None:
    if path not in defense_cls.supported_paths():
        have = ", ".join(sorted(p.value for p in defense_cls.supported_paths()))
        raise IncompatibleError(
            f"defense '{defense_cls.name}' cannot run under threat '{spec.name}': it has no '{path.value}' "
            f"gradient path (supports: {have})"
        )


def _check_attack(defense_cls: type[Defense], spec: ThreatSpec, cls: type[Attack], path: GradientPath, suite: str | None) -> None:
    within = f" (in {suite})" if suite else ""
    if spec.norm not in cls.norms:
        raise HarnessError(
            f"threat '{spec.name}': attack '{cls.name}'{within} supports {', '.join(sorted(cls.norms))}, not {spec.norm}"
        )
    stochastic = defense_cls.stochastic and path is not GradientPath.CLASSIFIER
    if stochastic and cls.eot == "none":
        hint = " (use autoattack-rand)" if suite == "autoattack-standard" else ""
        raise IncompatibleError(
            f"defense '{defense_cls.name}' is stochastic and attack '{cls.name}'{within} has no EOT: it assumes a "
            f"deterministic model on the {path.value} path{hint}"
        )
    missing = sorted(set(cls.requires) - set(defense_cls.provides))
    if missing:
        raise IncompatibleError(
            f"attack '{cls.name}'{within} needs {', '.join(missing)}, which defense '{defense_cls.name}' does not provide"
        )


def _also_paths(defense_cls: type[Defense], spec: ThreatSpec, main: GradientPath) -> tuple[list[GradientPath], list[str]]:
    also: list[GradientPath] = []
    notes: list[str] = []
    declared = [p.value for p in defense_cls.also_attack_through] if spec.gradient_path == "auto" else []
    for name in [*declared, *spec.also_paths]:
        p = parse_gradient_path(name)
        if main is GradientPath.CLASSIFIER:
            notes.append(f"also_paths {name} ignored: the main attack is classifier-only (nothing defended to attack)")
        elif p is main or p in also:
            continue
        elif p not in defense_cls.supported_paths():
            notes.append(f"also_paths {name} ignored: defense '{defense_cls.name}' has no {name} gradient path")
        else:
            also.append(p)
    return also, notes


def build_plan(defense_cls: type[Defense], spec: ThreatSpec) -> AttackPlan:
    """Expand and check the attacks of ``spec`` against ``defense_cls`` (see the module docstring)."""
    main = main_path_for(defense_cls, spec)
    also, notes = _also_paths(defense_cls, spec, main)
    if spec.gradient_path == "auto" and main is GradientPath.BPDA:
        notes.insert(0, f"gradient_path auto -> bpda: defense '{defense_cls.name}' declares no differentiable path "
                        "(full, adjoint or surrogate), so the attacks differentiate through BPDA")
    planned: list[PlannedAttack] = []
    seen: set[str] = set()
    for k, path in enumerate([main] + also):
        for entry in spec.attacks:
            name, pinned = split_attack_entry(entry)
            if pinned is not None and k > 0:
                continue  # a pinned attack runs once, through its own path
            p = parse_gradient_path(pinned) if pinned is not None else path
            _check_path(defense_cls, spec, p)
            stochastic = defense_cls.stochastic and p is not GradientPath.CLASSIFIER
            suite = name if name in SUITES else None
            members = SUITES.get(name).members(stochastic) if suite else (name,)
            for member in members:
                cls = ATTACKS.get(member)
                if k > 0 and not (cls.needs_gradients and cls.uses_path):
                    why = "it uses no gradient, so every path gives it the same model" if not cls.needs_gradients else (
                        "it does not differentiate along a gradient path")
                    notes.append(f"{member} not repeated through {p.value}: {why}")
                    continue
                label = member if p is main else f"{member}@{p.value}"
                if label in seen:
                    continue
                _check_attack(defense_cls, spec, cls, p, suite)
                seen.add(label)
                attack = cls.from_options(spec, spec.options_for_attack(member))
                planned.append(PlannedAttack(label=label, attack=attack, path=p, suite=suite))
    _validate_attack_options(spec)
    return AttackPlan(attacks=tuple(planned), main_path=main, also_paths=tuple(also), notes=tuple(dict.fromkeys(notes)))


def _validate_attack_options(spec: ThreatSpec) -> None:
    """Every ``attack_options`` entry must name a registered attack and a valid option of it,
    also when that attack is not in this pair's plan (a typo is an error, not silence).
    """
    for item in spec.attack_options:
        owner = item.split("=", 1)[0].split(".", 1)[0]
        ATTACKS.get(owner).from_options(spec, spec.options_for_attack(owner))
