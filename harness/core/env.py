"""Environment capture: package versions (part of a job's identity) and machine facts."""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

import harness

#: Where the shipped weights live (the package's ``weights/`` folder, installed with it).
WEIGHTS_DIR = Path(harness.__file__).resolve().parent / "weights"

#: Packages whose versions can change a number; they enter every job's identity hash.
IDENTITY_PACKAGES = ("torch", "torchvision", "numpy", "pyautoattack", "torchsde", "torchdiffeq", "diffusers")


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int) -> str:
    return sha256_file(path)


@lru_cache(maxsize=None)
def _source_file(klass: type) -> str | None:
    """The file that defines ``klass`` (None: none, e.g. built in a REPL), looked up once per class."""
    try:
        path = inspect.getsourcefile(klass)
    except TypeError:
        return None
    return path if path and os.path.isfile(path) else None


def source_digest(cls: type, stop: type | None = None) -> dict[str, str]:
    """sha256 of the source file of ``cls`` and of every base class's file up to ``stop``.

    Part of a plugin's job identity, so that editing a defense, attack or shift (or a
    shared helper module its class inherits from) never reuses a result stored by the
    old code. Files are named by their base name, so the digest does not depend on
    where the checkout lives. Classes without a source file (built in a REPL) give {}.
    """
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if stop is not None and klass is stop:
            break
        if klass is object:
            break
        path = _source_file(klass)
        if path is None:
            continue
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            continue
        out[os.path.basename(path)] = _file_digest(path, mtime)
    return dict(sorted(out.items()))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Installed versions of the harness and the IDENTITY_PACKAGES (None when one is not installed)."""
    out = {"harness": harness.__version__}
    out.update({p: _version(p) for p in IDENTITY_PACKAGES})
    return out


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The harness checkout's commit (``-dirty`` with uncommitted changes to tracked files), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def _machine() -> dict:
    """What does not change while a process runs: versions, Python, platform, host, CPU count, commit."""
    return {
        "packages": {**package_versions(), "sqlalchemy": _version("sqlalchemy"), "robustbench": _version("robustbench")},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "git_sha": git_sha(),
        "processor": platform.processor() or platform.machine(),
    }


def environment(device: torch.device | str) -> dict:
    """Where a job ran: package versions, Python, platform, host, CPU and thread counts, device and its name, git commit."""
    device = torch.device(device)
    machine = dict(_machine())
    processor = machine.pop("processor")
    env = {
        **machine,
        "packages": dict(machine["packages"]),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # PASSIVE by default from the CLI (harness.cli.OMP_WAIT_POLICY)
        "device": str(device),
        # every batch runs inside harness.core.numerics.no_tf32: plain float32 matmuls and convolutions on CUDA
        "tf32_during_evaluation": False,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = processor
    return env
