"""ImageNet validation images from a user's folder, decoded on demand (``--dataset imagenet --data-dir DIR``).

Two layouts of the ILSVRC2012 validation set are read (nothing is ever downloaded):

- **ImageFolder** (torchvision's, DiffPure's and RobustBench's): ``DIR/<synset>/<file>``
  with one folder per WordNet id (``n01440764`` ...), or a root holding ``val/`` so
  arranged (RobustBench's ``data_dir/val``);
- **flat**: the 50000 ``ILSVRC2012_val_XXXXXXXX.JPEG`` files of the release in ``DIR``,
  with a ground truth in ``DIR`` or beside it: the extracted devkit folder
  ``ILSVRC2012_devkit_t12/`` (``data/meta.mat`` and
  ``data/ILSVRC2012_validation_ground_truth.txt``), Kaggle's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``, the synset first), or a ``val.txt`` of
  ``<file> <class index>`` lines (Caffe's).

Labels are the index of the synset among the 1000 sorted synsets, the convention of
torchvision's, timm's and RobustBench's classifiers (RobustBench's
``imagenet_class_to_id_map.json`` is the list), so a folder holding only some classes
still carries the right labels. The images are ordered as torchvision's ``ImageFolder``
orders them (synsets sorted, then files sorted), the flat layout by (synset, file name)
too: DiffPure draws its ImageNet subsets with
``np.random.RandomState(data_seed).choice(50000, 16, replace=False)`` over the
``ImageFolder`` of the validation set, so ``--data-seed s --n-examples 16`` selects
DiffPure's subset s (given all 50000 images).

``imagenet-rb5000`` is RobustBench's evaluation list (``helper_files/imagenet_test_image_ids.txt``
of the pinned robustbench package: 5000 ``<synset>/<file>`` lines), in that order: all
5000 images are RobustBench's ImageNet test set.

Each image is decoded with PIL (RGB), resized so its shorter side is 256 (bilinear, as
``torchvision.transforms.Resize(256)`` on a PIL image) and centre-cropped to 224
(``CenterCrop(224)``): DiffPure's and RobustBench's ``Res256Crop224``. Only the drawn
images are read; the decoded subset is cached in the process. The identity of a subset
is the index (relative paths, labels and sizes of every image: its sha256) plus the
sha256 of the files drawn.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.env import sha256_file
from harness.core.registry import HarnessError, MissingFileError

#: Images in the ILSVRC2012 validation set.
VAL_SIZE = 50000
#: The preprocessing of DiffPure's and RobustBench's ImageNet evaluation.
RESIZE, CROP = 256, 224
_SYNSET = re.compile(r"^n\d{8}$")
_VAL_FILE = re.compile(r"^ILSVRC2012_val_\d{8}\.(JPEG|jpeg|jpg|JPG|png)$")
#: Ground-truth files of the flat layout, looked for in the folder and beside it.
GROUND_TRUTH = ("ILSVRC2012_devkit_t12", "LOC_val_solution.csv", "val.txt")
WHAT_TO_SUPPLY = (
    "the ILSVRC2012 validation set: a folder of 1000 synset folders (torchvision ImageFolder, e.g. after "
    "torchvision.datasets.ImageNet's val preparation), or the 50000 ILSVRC2012_val_*.JPEG files with "
    "ILSVRC2012_devkit_t12/, LOC_val_solution.csv or val.txt beside them"
)


def _robustbench_file(name: str) -> Path:
    spec = importlib.util.find_spec("robustbench")  # located, not imported (robustbench imports torch and timm)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "helper_files" / name
        if path.is_file():
            return path
    raise HarnessError(f"robustbench's helper_files/{name} is not installed (the pinned robustbench package ships it)")


@lru_cache(maxsize=None)
def synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted; RobustBench's ``imagenet_class_to_id_map.json``)."""
    mapping = json.loads(_robustbench_file("imagenet_class_to_id_map.json").read_text())
    out = tuple(sorted(mapping, key=mapping.__getitem__))
    if len(out) != 1000 or list(out) != sorted(out):
        raise HarnessError("robustbench's imagenet_class_to_id_map.json is not the 1000 sorted synsets")
    return out


@lru_cache(maxsize=None)
def robustbench_ids() -> tuple[str, ...]:
    """RobustBench's 5000 ImageNet evaluation images, ``<synset>/<file>``, in its order."""
    lines = [ln.strip() for ln in _robustbench_file("imagenet_test_image_ids.txt").read_text().splitlines() if ln.strip()]
    if len(lines) != 5000:
        raise HarnessError(f"robustbench's imagenet_test_image_ids.txt holds {len(lines)} entries, not 5000")
    return tuple(lines)


# --------------------------------------------------------------------------- the index
@dataclass(frozen=True, eq=False)
class ImageIndex:
    """The images of a split: files and labels in the dataset's order; decoded on demand.

    Attributes:
        root: The folder the relative paths start from.
        files: Relative paths (``<synset>/<file>`` or ``<file>``), in order.
        y: int64 labels (0..999).
        source: What identifies the index (kind, folder name, image count, list, sha256 of the index).
    """

    root: Path
    files: tuple[str, ...]
    y: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    def images(self, indices: np.ndarray | None = None) -> np.ndarray:
        """uint8 (n, 3, 224, 224) images at ``indices`` (all of them for None: only for small folders)."""
        idx = np.arange(len(self.files)) if indices is None else np.asarray(indices)
        return _decoded(self.root, tuple(self.files[i] for i in idx.tolist()))

    def subset_source(self, indices: np.ndarray) -> dict[str, Any]:
        """The source with the sha256 of the drawn files (over their sha256s, in drawing order)."""
        h = hashlib.sha256()
        for i in np.asarray(indices).tolist():
            h.update(sha256_file(self.root / self.files[i]).encode())
        return {**self.source, "images_sha256": h.hexdigest()}


@lru_cache(maxsize=4)
def _decoded(root: Path, files: tuple[str, ...]) -> np.ndarray:
    # a grid resolves every cell of a dataset with the same subset: decode it once
    out = np.empty((len(files), 3, CROP, CROP), dtype=np.uint8)
    for i, rel in enumerate(files):
        out[i] = decode(root / rel)
    out.setflags(write=False)
    return out


def decode(path: Path) -> np.ndarray:
    """One image as DiffPure and RobustBench prepare it: RGB, ``Resize(256)``, ``CenterCrop(224)``; uint8 (3, 224, 224)."""
    from PIL import Image
    from torchvision import transforms

    try:
        with Image.open(path) as im:
            im = transforms.CenterCrop(CROP)(transforms.Resize(RESIZE)(im.convert("RGB")))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read image '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _index_sha256(root: Path, files: tuple[str, ...], y: np.ndarray) -> str:
    h = hashlib.sha256()
    for rel, label in zip(files, y.tolist(), strict=True):
        h.update(f"{rel}\t{label}\t{os.stat(root / rel).st_size}\n".encode())
    return h.hexdigest()


def _image_folder_root(path: Path) -> Path | None:
    """``path`` or ``path/val`` when it holds synset folders, else None."""
    for cand in (path, path / "val"):
        if cand.is_dir() and any(_SYNSET.match(e.name) and e.is_dir() for e in os.scandir(cand)):
            return cand
    return None


def _scan_image_folder(root: Path) -> tuple[tuple[str, ...], np.ndarray]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    index = {s: i for i, s in enumerate(synsets())}
    present = sorted(e.name for e in os.scandir(root) if e.is_dir())
    unknown = [d for d in present if d not in index]
    if unknown:
        raise HarnessError(f"'{root}' holds folder(s) that are not ImageNet-1k synsets: {', '.join(unknown[:3])}")
    # torchvision's own walk: classes sorted, then files sorted (ImageFolder's order); labels among all 1000 synsets
    samples = make_dataset(str(root), {d: index[d] for d in present}, extensions=IMG_EXTENSIONS, allow_empty=True)
    files = tuple(os.path.relpath(p, root) for p, _ in samples)
    return files, np.array([c for _, c in samples], dtype=np.int64)


def _flat_ground_truth(folder: Path) -> tuple[dict[str, str], str]:
    """File name -> synset for the flat layout, and the ground-truth file's name."""
    for where in (folder, folder.parent):
        for name in GROUND_TRUTH:
            gt = where / name
            if name.endswith("_t12") and gt.is_dir():
                return _devkit_labels(gt), name
            if gt.is_file():
                return (_kaggle_labels(gt) if name.endswith(".csv") else _index_labels(gt)), name
    raise MissingFileError(
        f"'{folder}' holds flat ILSVRC2012_val_*.JPEG files but no ground truth: put {', '.join(GROUND_TRUTH)} "
        f"(any one) in it or beside it"
    )


def _devkit_labels(devkit: Path) -> dict[str, str]:
    """The devkit's ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012_IDs, file order) mapped through ``meta.mat``."""
    meta, txt = devkit / "data" / "meta.mat", devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    if not (meta.is_file() and txt.is_file()):
        raise MissingFileError(f"devkit '{devkit}' lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt")
    from scipy.io import loadmat

    rows = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(r[0]): str(r[1]) for r in rows if int(r[4]) == 0}  # (ILSVRC2012_ID, WNID, ..., num_children, ...)
    ids = [int(v) for v in txt.read_text().split()]
    try:
        return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": id_to_wnid[k] for i, k in enumerate(ids)}
    except KeyError as exc:
        raise HarnessError(f"'{txt}': ILSVRC2012_ID {exc} is not a leaf synset of meta.mat") from None


def _kaggle_labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise HarnessError(f"'{path}' is not LOC_val_solution.csv (columns ImageId, PredictionString)")
    return {f"{r['ImageId']}.JPEG": r["PredictionString"].split()[0] for r in rows}


def _index_labels(path: Path) -> dict[str, str]:
    names = synsets()
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit() or not 0 <= int(parts[1]) < 1000:
            raise HarnessError(f"'{path}' line {n}: expected '<file> <class index 0..999>', got {line!r}")
        out[parts[0]] = names[int(parts[1])]
    return out


def _scan_flat(folder: Path) -> tuple[tuple[str, ...], np.ndarray, str]:
    labels, gt_name = _flat_ground_truth(folder)
    index = {s: i for i, s in enumerate(synsets())}
    names = [e.name for e in os.scandir(folder) if e.is_file() and _VAL_FILE.match(e.name)]
    stem = {Path(k).stem: v for k, v in labels.items()}
    missing = [n for n in names if Path(n).stem not in stem]
    if missing:
        raise HarnessError(f"the ground truth {gt_name} has no label for {len(missing)} image(s), e.g. {missing[0]}")
    bad = sorted({stem[Path(n).stem] for n in names} - set(index))
    if bad:
        raise HarnessError(f"the ground truth {gt_name} names synset(s) outside ImageNet-1k: {', '.join(bad[:3])}")
    # ImageFolder's order of the same images sorted into synset folders
    ordered = sorted(names, key=lambda n: (stem[Path(n).stem], n))
    return tuple(ordered), np.array([index[stem[Path(n).stem]] for n in ordered], dtype=np.int64), gt_name


def _restrict_to_robustbench(root: Path, files: tuple[str, ...], y: np.ndarray, flat: bool) -> tuple[tuple[str, ...], np.ndarray]:
    """RobustBench's 5000 images in its order (matched by file name in the flat layout, with the label checked)."""
    ids = robustbench_ids()
    where = {(Path(f).name if flat else f): i for i, f in enumerate(files)}
    names = synsets()
    keys = [Path(r).name if flat else r for r in ids]
    absent = [r for r, k in zip(ids, keys, strict=True) if k not in where]
    if absent:
        raise MissingFileError(
            f"'{root}' lacks {len(absent)} of RobustBench's 5000 ImageNet images, e.g. {absent[0]} "
            f"(robustbench helper_files/imagenet_test_image_ids.txt; supply {WHAT_TO_SUPPLY})"
        )
    pos = [where[k] for k in keys]
    for r, i in zip(ids, pos, strict=True):
        if names[y[i]] != r.split("/")[0]:
            raise HarnessError(f"RobustBench lists {r}, but '{root}' labels {files[i]} as {names[y[i]]}")
    return tuple(files[i] for i in pos), y[pos]


@lru_cache(maxsize=8)
def _index_cached(name: str, path: Path, stamp: int) -> ImageIndex:
    # ``stamp`` (the folder's mtime) is only part of the cache key: a changed folder is scanned again
    root = _image_folder_root(path)
    if root is not None:
        files, y = _scan_image_folder(root)
        kind, extra = "imagefolder", {}
    elif any(_VAL_FILE.match(e.name) for e in os.scandir(path)):
        root = path
        files, y, gt = _scan_flat(path)
        kind, extra = "ilsvrc2012-flat", {"ground_truth": gt}
    else:
        raise HarnessError(f"'{path}' is neither an ImageNet ImageFolder nor a folder of ILSVRC2012_val_*.JPEG: supply {WHAT_TO_SUPPLY}")
    if not files:
        raise HarnessError(f"'{root}' holds no images")
    n_folder = len(files)
    listing = "all"
    if name == "imagenet-rb5000":
        files, y = _restrict_to_robustbench(root, files, y, kind == "ilsvrc2012-flat")
        listing = "robustbench-5000"
    source = {
        "kind": kind, "name": root.name, "images": len(files), "images_in_folder": n_folder, "list": listing,
        "transform": f"resize{RESIZE}-centercrop{CROP}", **extra, "sha256": _index_sha256(root, files, y),
    }
    return ImageIndex(root=root, files=files, y=y, source=source)


def load_index(name: str, split: str, data_dir: str | Path | None) -> ImageIndex:
    """The index of ``imagenet`` / ``imagenet-rb5000`` in ``data_dir`` (split ``test`` = the validation set).

    Raises:
        HarnessError: no ``data_dir``, a folder in neither layout, labels outside ImageNet-1k;
            MissingFileError when the folder, its ground truth or RobustBench's images are not there.
    """
    if split != "test":
        raise HarnessError(f"dataset '{name}' is the ImageNet validation set: only split 'test' exists here, not '{split}'")
    if data_dir is None or str(data_dir) == "":
        raise HarnessError(f"dataset '{name}' needs --data-dir: {WHAT_TO_SUPPLY}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"ImageNet data dir '{path}' does not exist: supply {WHAT_TO_SUPPLY}")
    path = path.resolve()
    return _index_cached(name, path, path.stat().st_mtime_ns)
