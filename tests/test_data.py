"""Dataset registry: bundled datasets, CIFAR from .npz and torchvision folders, subsets, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import DATASETS, EvalSubset, eval_subset, load_split
from harness.core.registry import HarnessError


# --------------------------------------------------------------------------- bundled datasets
@pytest.mark.parametrize(
    "name, shape, n_test, n_train",
    [("digits", (1, 8, 8), 450, 1347), ("mnist5k", (1, 28, 28), 1000, 4000)],
)
def test_bundled_splits(name, shape, n_test, n_train):
    info = DATASETS.get(name)
    assert info.image_shape == shape and not info.needs_data_dir and info.num_classes == 10
    x, y = load_split(name, "test")
    assert x.shape == (n_test, *shape) and x.dtype == torch.float32
    assert y.shape == (n_test,) and y.dtype == torch.int64
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0 and x.max().item() == 1.0
    assert set(y.unique().tolist()) == set(range(10))  # the permutation spreads every class
    xt, yt = load_split(name, "train")
    assert xt.shape == (n_train, *shape)
    # Train and test are disjoint pieces of one permutation: no test image is in train.
    flat_train = {row.tobytes() for row in (xt.numpy().reshape(n_train, -1) * 255).round().astype(np.uint8)}
    flat_test = [row.tobytes() for row in (x.numpy().reshape(n_test, -1) * 255).round().astype(np.uint8)]
    assert sum(r in flat_train for r in flat_test) < n_test * 0.02  # (the raw data holds a few duplicates)


def test_load_split_returns_fresh_tensors():
    x1, _ = load_split("digits")
    x1.fill_(7.0)  # an attack modifying its input in place must not poison the cache
    x2, _ = load_split("digits")
    assert x2.max().item() <= 1.0


def test_eval_subset_reproducible_and_identity():
    a = eval_subset("digits", n=64, data_seed=3)
    b = eval_subset("digits", n=64, data_seed=3)
    c = eval_subset("digits", n=64, data_seed=4)
    assert isinstance(a, EvalSubset)
    assert np.array_equal(a.indices, b.indices) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not np.array_equal(a.indices, c.indices)
    assert a.identity == b.identity and a.identity["indices_sha256"] != c.identity["indices_sha256"]
    # The DiffPure draw, exactly.
    assert np.array_equal(a.indices, np.random.RandomState(3).choice(450, 64, replace=False))
    x, y = load_split("digits")
    assert torch.equal(a.x, x[torch.from_numpy(a.indices)]) and torch.equal(a.y, y[torch.from_numpy(a.indices)])
    ident = a.identity
    assert set(ident) == {"dataset", "split", "n", "data_seed", "indices_sha256", "source"}
    assert ident["dataset"] == "digits" and ident["n"] == 64 and ident["data_seed"] == 3 and ident["split"] == "test"
    assert ident["source"]["name"] == "sklearn.datasets.load_digits" and len(ident["source"]["sha256"]) == 64
    json.dumps(ident)  # JSON-able, it enters the job hash


def test_eval_subset_default_n_and_errors():
    assert len(eval_subset("digits").y) == DATASETS.get("digits").default_n == 256
    assert len(eval_subset("digits", n=450).y) == 450
    with pytest.raises(HarnessError, match=r"n=451 is more than the 450 images"):
        eval_subset("digits", n=451)
    with pytest.raises(HarnessError, match="positive"):
        eval_subset("digits", n=0)
    with pytest.raises(HarnessError, match="unknown split 'val'"):
        load_split("digits", "val")


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, 1.5, True])
def test_data_seed_out_of_numpys_range_is_a_one_line_error(seed):
    with pytest.raises(HarnessError, match=r"data_seed=.* is out of range: an integer in 0\.\.4294967295"):
        eval_subset("digits", n=8, data_seed=seed)
    assert len(eval_subset("digits", n=8, data_seed=2**32 - 1).y) == 8


def test_unknown_dataset_suggests_closest():
    with pytest.raises(HarnessError, match=r"unknown dataset 'digit'; did you mean 'digits'\?"):
        load_split("digit")
    with pytest.raises(HarnessError, match="did you mean 'cifar10'"):
        eval_subset("cifar1O")


# --------------------------------------------------------------------------- CIFAR: errors
def test_cifar_needs_data_dir():
    msg = (
        "dataset 'cifar10' needs --data-dir: a torchvision CIFAR-10 folder (containing cifar-10-batches-py) "
        "or an .npz with x (uint8 NHWC) and y"
    )
    with pytest.raises(HarnessError) as exc:
        load_split("cifar10")
    assert str(exc.value) == msg
    with pytest.raises(HarnessError, match="cifar-100-python"):
        eval_subset("cifar100")


def test_missing_path_names_itself(tmp_path):
    missing = tmp_path / "nowhere" / "cifar.npz"
    with pytest.raises(HarnessError, match=f"data dir '{missing}' does not exist"):
        load_split("cifar10", data_dir=missing)
    with pytest.raises(HarnessError, match="is not a CIFAR-10 folder"):
        load_split("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------- CIFAR: npz
def _tiny_npz(path: Path, n: int = 12, classes: int = 10, **extra) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, size=(n, 32, 32, 3)).astype(np.uint8)
    y = rng.randint(0, classes, size=n)
    arrays = {"x": x, "y": y}
    arrays.update(extra)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return x, y


def test_cifar10_from_npz(tmp_path):
    path = tmp_path / "tiny_cifar10.npz"
    x_np, y_np = _tiny_npz(path)
    x, y = load_split("cifar10", "test", data_dir=path)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(x_np).permute(0, 3, 1, 2).float() / 255)  # NHWC -> NCHW
    assert torch.equal(y, torch.from_numpy(y_np))
    # An npz holds one split; it is used as whichever split is asked for.
    assert torch.equal(load_split("cifar10", "train", data_dir=str(path))[0], x)
    sub = eval_subset("cifar10", n=5, data_seed=1, data_dir=path)
    src = sub.identity["source"]
    assert src["kind"] == "npz" and src["name"] == "tiny_cifar10.npz"  # a basename, never the full path
    assert str(tmp_path) not in json.dumps(sub.identity)
    import hashlib

    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(HarnessError, match="n=13 is more than the 12 images"):
        eval_subset("cifar10", n=13, data_dir=path)


def test_cifar100_npz_accepts_y_fine(tmp_path):
    rng = np.random.RandomState(1)
    x = rng.randint(0, 256, size=(6, 32, 32, 3)).astype(np.uint8)
    y_fine, y_coarse = rng.randint(0, 100, size=6), rng.randint(0, 20, size=6)
    path = tmp_path / "c100.npz"
    np.savez(path, x=x, y_fine=y_fine, y_coarse=y_coarse)
    _, y = load_split("cifar100", data_dir=path)
    assert y.tolist() == y_fine.tolist()
    assert eval_subset("cifar100", n=3, data_dir=path).identity["source"]["labels"] == "y_fine"


def test_npz_replaced_on_disk_is_reloaded(tmp_path):
    path = tmp_path / "c.npz"
    _tiny_npz(path, n=12)
    assert len(load_split("cifar10", data_dir=path)[1]) == 12
    _tiny_npz(path, n=7)
    os.utime(path, ns=(1, 10**18))  # make sure the (mtime, size) cache key changes
    assert len(load_split("cifar10", data_dir=path)[1]) == 7


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((4, 32, 32), np.uint8), "y": np.zeros(4, int)}, r"x has shape \(4, 32, 32\), expected \(N, 32, 32, 3\)"),
        ({"x": np.zeros((4, 28, 28, 3), np.uint8), "y": np.zeros(4, int)}, "x has shape"),
        ({"x": np.zeros((4, 32, 32, 3), np.uint8), "y": np.zeros(5, int)}, r"y has shape \(5,\)"),
        ({"x": np.full((4, 32, 32, 3), np.nan, np.float32), "y": np.zeros(4, int)}, "NaN"),
        ({"x": np.full((4, 32, 32, 3), 3.0, np.float32), "y": np.zeros(4, int)}, r"\[0, 1\]"),
        ({"x": np.zeros((4, 32, 32, 3), np.uint8), "y": np.array([0, 1, 2, 10])}, r"labels must lie in 0\.\.9"),
        ({"x": np.zeros((4, 32, 32, 3), np.uint8)}, "has no labels"),
        ({"images": np.zeros((4, 32, 32, 3), np.uint8), "y": np.zeros(4, int)}, "has no array 'x'"),
    ],
)
def test_bad_npz_is_a_one_line_error(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(HarnessError, match=match) as exc:
        load_split("cifar10", data_dir=path)
    assert "\n" not in str(exc.value)


def test_not_an_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(HarnessError, match="cannot read"):
        load_split("cifar10", data_dir=path)
    other = tmp_path / "images.tar"
    other.write_bytes(b"x")
    with pytest.raises(HarnessError, match="is not an .npz"):
        load_split("cifar10", data_dir=other)


# --------------------------------------------------------------------------- CIFAR: torchvision folders
def _write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> None:
    # The official files are Python-2 pickles with bytes keys; write bytes keys too.
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"data": data, label_key.encode(): labels}, f, protocol=2)


def _fake_cifar10(root: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, size=(per_batch, 3072)).astype(np.uint8)
        labels = rng.randint(0, 10, size=per_batch).tolist()
        _write_batch(folder / name, data, labels, "labels")
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10}, f, protocol=2)
    return batches


def test_cifar10_torchvision_folder(tmp_path):
    # torchvision's CIFAR10 md5-checks these files and would refuse them; the harness
    # reads the (identical-format) pickles itself.
    batches = _fake_cifar10(tmp_path)
    x, y = load_split("cifar10", "test", data_dir=tmp_path)
    data, labels = batches["test_batch"]
    assert x.shape == (4, 3, 32, 32)
    # Row layout of the pickles: 1024 red, then green, then blue values, row-major.
    assert torch.equal(x, torch.from_numpy(data.reshape(4, 3, 32, 32)).float() / 255)
    assert y.tolist() == labels
    # The folder itself works as well as its root.
    x2, _ = load_split("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")
    assert torch.equal(x, x2)
    xt, yt = load_split("cifar10", "train", data_dir=tmp_path)
    assert xt.shape == (20, 3, 32, 32)
    assert yt.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    src = eval_subset("cifar10", n=3, data_dir=tmp_path).identity["source"]
    assert src["kind"] == "torchvision-folder" and src["name"] == "cifar-10-batches-py" and len(src["sha256"]) == 64


def test_cifar10_folder_missing_batch(tmp_path):
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert load_split("cifar10", "test", data_dir=tmp_path)[0].shape[0] == 4  # test split unaffected
    with pytest.raises(HarnessError, match="lacks 'data_batch_3'"):
        load_split("cifar10", "train", data_dir=tmp_path)


def test_cifar100_torchvision_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.RandomState(2)
    data = rng.randint(0, 256, size=(5, 3072)).astype(np.uint8)
    fine = [0, 99, 42, 7, 55]
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * 5}, f, protocol=2)
    x, y = load_split("cifar100", "test", data_dir=tmp_path)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == fine


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_folder_pickles_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": [0]}, f)
    with pytest.raises(HarnessError, match="refusing to load"):
        load_split("cifar10", data_dir=tmp_path)
