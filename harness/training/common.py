"""What every trainer shares: the weights folder, atomic writes, recipes, resumable checkpoints.

A trainer writes three files beside each other: ``<name>.pt`` (the weights, a plain
state dict that ``torch.load(..., weights_only=True)`` opens), ``<name>.json`` (the
recipe, training curve, sha256 of the ``.pt``, accuracies and the command that rewrites
it) and, while it runs, ``<name>.ckpt`` (everything needed to resume bit-identically).
Files are written to a temporary name and renamed, so an interrupted run never leaves
a half-written file that a concurrent evaluation would load.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from harness.core.env import WEIGHTS_DIR, sha256_file
from harness.core.registry import HarnessError, first_line

__all__ = [
    "WEIGHTS_DIR", "atomic_save", "atomic_write_text", "check_gpu_recipe", "checkpoint_or_stop", "engine_eval", "record_step",
    "load_resume_checkpoint", "output_paths", "sha256_file",
    "stop_on_sigint", "write_record",
]


def output_paths(out: str | Path | None, name: str, *exts: str) -> tuple[Path, ...]:
    """``<out>/<name><ext>`` for every extension; ``out=None`` is the shipped weights folder."""
    out_dir = Path(out).expanduser() if out is not None else WEIGHTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    return tuple(out_dir / f"{name}{ext}" for ext in exts)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    """Write text to a temporary file, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_record(record: dict, json_path: Path) -> None:
    """The recipe record beside the weights (indented JSON, atomically)."""
    atomic_write_text(json.dumps(record, indent=2) + "\n", json_path)


def engine_eval(
    defense: str, dataset: str, classifier: str, clf_weights: str | None, data_dir: str | None, n: int,
    overrides: tuple[tuple[str, str], ...] = (), threat: str = "preprocessor-blind",
) -> dict:
    """Clean and robust accuracy of ``defense`` under ``threat`` (default preprocessor-blind) with the harness engine.

    The record a trainer writes into its json beside the weights: the threat's budget, n,
    seeds, draws and scoring, the headline (worst-of-R) and single-draw accuracies with
    their 95% Wilson intervals, and the command that reproduces the number.
    """
    from harness.evaluation import RunConfig, resolve, run_job
    from harness.store import Store

    cfg = RunConfig(defense=defense, threat=threat, dataset=dataset, classifier=classifier, weights=clf_weights,
                    data_dir=data_dir, n_examples=n, overrides=tuple(overrides))
    job = resolve(cfg)
    res = run_job(job, Store("sqlite://"), progress=False)
    out, m = res.as_json(), res.metrics

    def ci(key: str) -> list | None:
        return [round(m[key]["lower"], 6), round(m[key]["upper"], 6)] if m.get(key, {}).get("lower") is not None else None

    sets = " ".join(f"--set {k}={v}" for k, v in overrides if k not in ("weights", "model_path"))
    return {
        "defense": defense,
        "threat": threat,
        "threat_spec": {k: job.spec.to_dict()[k] for k in ("norm", "eps", "steps", "step_size", "random_start")},
        "defense_config": {k: v for k, v in job.defense.identity()["config"].items() if v is not None},
        "n_examples": out["n_examples"],
        "seed": cfg.seed,
        "data_seed": cfg.data_seed,
        "eval_draws": out["eval_draws"],
        "scoring": out["scoring"],
        "clean_accuracy": round(out["clean_accuracy"], 6),
        "robust_accuracy": round(out["robust_accuracy"], 6),
        "clean_accuracy_ci95": ci("clean_accuracy"),
        "robust_accuracy_ci95": ci("robust_accuracy"),
        "clean_accuracy_single": round(m["clean_accuracy_single"]["value"], 6),
        "robust_accuracy_single": round(m["robust_accuracy_single"]["value"], 6),
        "seconds_per_example": round(out["timings"]["per_example_s"], 3),
        "command": f"harness run --defense {defense} --threat {threat} --dataset {dataset} --classifier {classifier}"
                   + (f" --weights {Path(clf_weights).name}" if clf_weights else "")
                   + (f" --data-dir {Path(data_dir).name}" if data_dir else "") + f" --n-examples {n}" + (f" {sets}" if sets else ""),
    }


def check_gpu_recipe(recipe: str, device: str) -> None:
    """``--recipe gpu`` only with ``--device cuda`` on a machine whose torch sees a GPU (it takes days on a CPU)."""
    if recipe != "gpu":
        return
    if not str(device).startswith("cuda"):
        raise HarnessError("--recipe gpu is sized for a GPU (days on a CPU): run it with --device cuda")
    if not torch.cuda.is_available():
        raise HarnessError("--recipe gpu needs a CUDA GPU, and torch sees none here")


def load_resume_checkpoint(path: Path, fingerprint: Any, *, what: str) -> dict | None:
    """The training checkpoint at ``path`` if it exists and was written by the same run.

    ``fingerprint`` is what must agree for a resume to continue the same run (recipe,
    data, seeds, victim classifier); a checkpoint from another run is a one-line error
    naming what differs, never silently continued.
    """
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HarnessError(f"cannot read training checkpoint '{path}': {first_line(exc)}") from None
    want = json.loads(json.dumps(fingerprint))
    if not isinstance(ck, dict) or "fingerprint" not in ck:
        raise HarnessError(f"'{path}' is not a {what} training checkpoint")
    if ck["fingerprint"] != want:
        if isinstance(want, dict) and isinstance(ck["fingerprint"], dict):
            diff = ", ".join(sorted(k for k in want if ck["fingerprint"].get(k) != want[k])) or "fields"
        else:
            diff = "fields"
        raise HarnessError(f"checkpoint '{path}' was written by a different run ({diff} differ); delete it or rerun without --resume")
    return ck


def record_step(curve: list, window: list, value: float, step: int, steps: int, every: int) -> list:
    """Add step ``step``'s loss to ``window`` ([sum, count]); every ``every`` steps and at the last one append
    ``[step + 1, mean]`` to ``curve``. Returns the window to carry on with (a fresh one after a curve point).
    """
    window[0] += value
    window[1] += 1
    if (step + 1) % every == 0 or step + 1 == steps:
        curve.append([step + 1, round(window[0] / window[1], 6)])
        return [0.0, 0]
    return window


def checkpoint_or_stop(step: int, steps: int, every: int, stop: dict, save: Callable[[int], None], bar, ckpt_path: Path) -> None:
    """After step ``step``: ``save(step + 1)`` every ``every`` steps (not after the last, whose weights are written)
    and when Ctrl-C asked to stop (:func:`stop_on_sigint`); then, if asked, close ``bar`` and raise KeyboardInterrupt.
    """
    if stop["asked"] or ((step + 1) % every == 0 and step + 1 < steps):
        save(step + 1)
    if stop["asked"]:
        bar.close()
        print(f"interrupted after step {step + 1}; checkpoint {ckpt_path} (continue with --resume)")
        raise KeyboardInterrupt


@contextmanager
def stop_on_sigint() -> Iterator[dict]:
    """Ctrl-C asks the training loop to stop at the end of the current step (``flag["asked"]``),
    so it can checkpoint where ``--resume`` continues bit-identically; a second Ctrl-C aborts.
    """
    flag = {"asked": False}
    restore = None
    if threading.current_thread() is threading.main_thread():
        def _ask_stop(signum, frame):
            if flag["asked"]:
                raise KeyboardInterrupt
            flag["asked"] = True

        restore = signal.signal(signal.SIGINT, _ask_stop)
    try:
        yield flag
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
