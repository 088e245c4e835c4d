"""``harness train classifier``: train the shipped small CNNs from scratch.

Reproduces ``harness/weights/digits-cnn.{pt,json}`` and ``mnist5k-cnn.{pt,json}``.
The recipe is deliberately plain (no augmentation, no BatchNorm, Adam with a cosine
learning-rate decay, a fixed number of epochs, no model selection on the test split)
so the undefended baseline is an ordinary classifier and its clean accuracy is an
honest test number. Everything is seeded: ``torch.manual_seed`` for the initial
weights and a dedicated ``torch.Generator`` for the shuffling order, so a rerun on the
same machine, torch version and thread count writes the same weights.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.classifiers import SMALL_CNNS
from harness.training.common import WEIGHTS_DIR, atomic_save, output_paths, sha256_file, write_record
from harness.data import load_split
from harness.core.registry import HarnessError
from harness.training import TRAINERS, Trainer


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters of one small CNN (recorded in its json)."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0


#: dataset -> (classifier name, recipe). Each trains in well under a minute on 2 CPU cores.
RECIPES: dict[str, tuple[str, Recipe]] = {
    "digits": ("digits-cnn", Recipe(epochs=40, lr=3e-3, batch_size=64)),
    "mnist5k": ("mnist5k-cnn", Recipe(epochs=10, lr=2e-3, batch_size=64)),
}


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item() for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def train_classifier(
    dataset: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train the small CNN of ``dataset`` and write ``<out>/<name>.pt`` and ``<name>.json``.

    Args:
        dataset: ``"digits"`` or ``"mnist5k"``.
        epochs: Number of epochs; None uses the recipe's.
        seed: Seed of the initial weights and of the shuffling order.
        out: Output folder; None means ``harness/weights`` inside the package.
        device: Where to train.

    Returns:
        The recorded json dict (recipe, sha256 of the .pt, clean test accuracy, ...).

    Raises:
        HarnessError: unknown dataset or a non-positive number of epochs.
    """
    if dataset not in RECIPES:
        raise HarnessError(f"no classifier recipe for dataset '{dataset}' (choose from {', '.join(RECIPES)})")
    name, recipe = RECIPES[dataset]
    epochs = recipe.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise HarnessError(f"epochs={epochs} is out of range (must be >= 1)")
    device = torch.device(device)
    spec = SMALL_CNNS[name]

    x_train, y_train = load_split(dataset, "train")
    x_test, y_test = load_split(dataset, "test")
    x_train, y_train = x_train.to(device), y_train.to(device)

    torch.manual_seed(seed)
    model = spec.build().to(device)
    shuffle = torch.Generator().manual_seed(seed)  # CPU generator: same order on any device
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(x_train) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=None)
    last_loss = float("nan")
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=shuffle).to(device)
        total, count = 0.0, 0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last_loss = total / count
        bar.set_postfix(loss=f"{last_loss:.4f}")
    train_time = time.perf_counter() - start

    model = model.cpu()
    test_acc = _accuracy(model, x_test, y_test)
    train_acc = _accuracy(model, x_train.cpu(), y_train.cpu())

    pt_path, json_path = output_paths(out, name, ".pt", ".json")
    atomic_save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, pt_path)

    record = {
        "name": name,
        "dataset": dataset,
        "arch": spec.arch,
        "params": sum(p.numel() for p in model.parameters()),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "split": {
            "train": len(x_train),
            "test": len(x_test),
            "rule": f"np.random.RandomState(0).permutation; last {len(x_test)} are test",
        },
        "epochs": epochs,
        "optimizer": "Adam",
        "lr": recipe.lr,
        "lr_schedule": "cosine to 0, per step",
        "weight_decay": recipe.weight_decay,
        "batch_size": recipe.batch_size,
        "augmentation": None,
        "seed": seed,
        "torch_version": torch.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 2),
        "final_train_loss": round(last_loss, 6),
        "clean_train_accuracy": round(train_acc, 6),
        "clean_test_accuracy": round(test_acc, 6),
        "sha256": sha256_file(pt_path),
        "command": f"harness train classifier --dataset {dataset} --epochs {epochs} --seed {seed}",
    }
    write_record(record, json_path)
    return record


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=sorted(RECIPES), help="which small CNN to train")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling")
    p.add_argument("--out", default=None, help=f"output folder (default: {WEIGHTS_DIR})")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _run(args: argparse.Namespace) -> int:
    rec = train_classifier(args.dataset, epochs=args.epochs, seed=args.seed, out=args.out, device=args.device)
    print(
        f"{rec['name']}: clean test accuracy {rec['clean_test_accuracy']:.4f} on {rec['split']['test']} images "
        f"({rec['epochs']} epochs, {rec['train_time_s']:.1f}s); wrote {output_paths(args.out, rec['name'], '.pt')[0]} "
        f"(sha256 {rec['sha256'][:12]}) and {rec['name']}.json"
    )
    return 0


TRAINERS.register(
    "classifier",
    Trainer(
        name="classifier",
        help="train the shipped small CNN of digits or mnist5k (writes <name>.pt and <name>.json)",
        add_arguments=_add_arguments,
        run=_run,
    ),
)
