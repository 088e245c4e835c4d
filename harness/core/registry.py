"""Name -> object registries with did-you-mean errors.

Every pluggable kind (defenses, threat models, datasets, classifiers) lives in one
module-level :class:`Registry`. Registration happens with a decorator at the class or
function, and discovery happens by importing the package that holds the plugins, so
there is one source of truth per entry::

    DEFENSES = Registry("defense")

    @DEFENSES.register("none")
    class NoDefense(Defense): ...

    DEFENSES.get("nnoe")   # HarnessError: unknown defense 'nnoe'; did you mean 'none'? ...
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class HarnessError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors.

    ``torch.load(..., weights_only=True)`` refusing a file (a legacy pickle, a whole model saved with
    ``torch.save(model)``) raises a many-line message whose first line only says "you have two options";
    it becomes one line naming what the file holds and what to do.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # terminal colours
    if text.startswith("Weights only load failed"):
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: ([^\n.]+)", text)
        what = f"it holds a pickled Python object ({m.group(1)})" if m else "it holds more than tensors"
        return (f"refused by torch.load(weights_only=True): {what}, as a legacy or whole-model save does; "
                "load it where you trust it and re-save its state_dict (torch.save(model.state_dict(), path))")
    return text.splitlines()[0] if text else type(exc).__name__


class MissingFileError(HarnessError):
    """A file or folder a job needs (weights, a checkpoint, a dataset folder) is not on this machine.

    The job itself is valid: a grid records its cell as ``skipped`` with this message,
    as it does for an incompatible pair, while any other HarnessError is a mistake that
    stops the grid before it runs. Plugins raise it for their own missing weights.
    """


def suggest(name: str, choices: list[str]) -> str:
    """Return a ``"; did you mean 'x'?"`` suffix for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if not close:
        close = [c for c in choices if name and (name in c or c in name)][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A named collection of plugins.

    Args:
        kind: What the registry holds ("defense", "threat", ...); used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._objs: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Registering a different object under a taken name raises, unless ``replace``.
        """

        def _store(target: T) -> T:
            current = self._objs.get(name)
            if current is not None and current is not target and not replace:
                # Re-importing the same plugin file (e.g. --plugin twice) is harmless.
                same = getattr(current, "__qualname__", None) == getattr(target, "__qualname__", 0) and getattr(
                    current, "__module__", None
                ) == getattr(target, "__module__", 0)
                if not same:
                    raise HarnessError(f"{self.kind} '{name}' is already registered ({current!r})")
            self._objs[name] = target
            return target

        if obj is not None:
            return _store(obj)
        return _store

    def get(self, name: str) -> T:
        """Look up ``name``; an unknown name raises a one-line error with a suggestion."""
        try:
            return self._objs[name]
        except KeyError:
            names = self.names()
            raise HarnessError(
                f"unknown {self.kind} '{name}'{suggest(name, names)} (available: {', '.join(names) or 'none'})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._objs)

    def items(self) -> Iterator[tuple[str, T]]:
        for k in self.names():
            yield k, self._objs[k]

    def unregister(self, name: str) -> None:
        self._objs.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._objs

    def __len__(self) -> int:
        return len(self._objs)



def class_registrar(registry: Registry, base: type, kind: str, check: Callable[[str, type], None] | None = None):
    """A ``register_<kind>(name)`` class decorator for ``registry``.

    The decorated class must subclass ``base``; it gets ``cls.name = name`` and joins
    the registry. ``check(name, cls)`` may raise for kind-specific rules.
    """

    def register(name: str):
        def deco(cls):
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise HarnessError(f"{kind} '{name}' must subclass harness.core.{base.__name__}")
            if check is not None:
                check(name, cls)
            cls.name = name
            registry.register(name, cls)
            return cls

        return deco

    register.__doc__ = f"Class decorator: register a :class:`{base.__name__}` subclass under ``name``."
    return register
