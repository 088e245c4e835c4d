"""Registry of ``harness train <kind>`` subcommands.

Each trainer module registers a :class:`Trainer`: a function adding its arguments to
an argparse parser, and a function running it from the parsed namespace. The CLI
builds ``harness train`` from this registry, so a new trainer touches no CLI code.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

from harness.core.registry import Registry


@dataclass(frozen=True)
class Trainer:
    """A ``harness train`` subcommand: its name, help, argument adder and run function (returning the exit status)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


TRAINERS: Registry[Trainer] = Registry("trainer")

#: Modules that register trainers; imported lazily by the CLI (heavy imports stay out of `harness ls`).
TRAINER_MODULES = (
    "harness.training.classifier", "harness.training.diffusion", "harness.training.flowpure", "harness.training.maep",
    "harness.training.consistency",
)


def load_trainers() -> Registry[Trainer]:
    """Import the trainer modules (skipping one that does not exist) and return the registry."""
    for mod in TRAINER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    return TRAINERS
