"""Loading plugins (defenses, attacks, shifts) from outside the harness.

Two ways, neither of which edits the harness:

- ``--plugin path/to/my_plugin.py`` (or a dotted module name): the file is imported, and
  its ``@register_defense``, ``@register_attack`` and ``@register_shift`` classes join
  the registries.
- a Python entry point in the group ``harness.defenses``, ``harness.attacks`` or
  ``harness.shifts`` of an installed package
  (``[project.entry-points."harness.defenses"] mydef = "my_pkg.my_defense"``); every
  such module is imported when the registries are first used.

A plugin's job identity includes the sha256 of its source file, so editing the file
and rerunning the same command computes a new result instead of reusing the old one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path

from harness.core.registry import HarnessError

ENTRY_POINT_GROUPS = ("harness.defenses", "harness.attacks", "harness.shifts")

_loaded_entry_points = False


def load_builtin() -> None:
    """Import the built-in defenses, threats, attacks and shifts (registration happens on import)."""
    import defenses  # noqa: F401
    import threat_models  # noqa: F401

    load_entry_points()


def load_entry_points() -> None:
    """Import every module registered under the harness's entry-point groups (once)."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            try:
                ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the harness
                warnings.warn(f"{group} entry point '{ep.name}' ({ep.value}) failed to load: {exc}")


#: (spec as given, working directory) -> module name of a plugin file already imported
_LOADED_FILES: dict[tuple[str, str], str] = {}


def load_plugin(spec: str) -> str:
    """Import a plugin given as a .py path or a module name; return the module name."""
    known = _LOADED_FILES.get((spec, os.getcwd()))
    if known is not None and known in sys.modules:  # a grid resolves every cell with its plugins: once is enough
        return known
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise HarnessError(f"plugin file {spec} does not exist")
        resolved = path.resolve()
        # a stable module name per file, so loading the same file twice is a no-op
        name = "harness_plugin_" + resolved.stem + "_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
        if name in sys.modules:
            _LOADED_FILES[(spec, os.getcwd())] = name
            return name
        _LOADED_FILES[(spec, os.getcwd())] = name
        mod_spec = importlib.util.spec_from_file_location(name, resolved)
        if mod_spec is None or mod_spec.loader is None:
            raise HarnessError(f"cannot import plugin file {spec}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except HarnessError:
            sys.modules.pop(name, None)
            raise
        except SystemExit as exc:  # a script's exit: one line naming the file, not the harness ending with its status
            sys.modules.pop(name, None)
            raise HarnessError(f"plugin {spec} called sys.exit({exc.code!r}) while it was imported: "
                               "a plugin only defines and registers classes") from None
        except Exception as exc:
            sys.modules.pop(name, None)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise HarnessError(f"plugin {spec} failed to import: {type(exc).__name__}: {msg}") from exc
        return name
    try:
        importlib.import_module(spec)
    except ImportError as exc:
        raise HarnessError(f"plugin module '{spec}' cannot be imported: {exc}") from exc
    except SystemExit as exc:
        raise HarnessError(f"plugin module '{spec}' called sys.exit({exc.code!r}) while it was imported") from None
    return spec
