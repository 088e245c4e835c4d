"""ImageNet without ImageNet: the data layouts on small folders the tests build, the classifiers, the paper grid.

The folders hold a few random images under real synset names (sizes other than 224 and
non-square, so the resize and crop matter). The classifiers are built and saved here
with random weights under the published file names; their sha256 then does not match
the published prefix, which the loaders must refuse unless the test patches the table.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import imagenet as I
from harness.core.registry import HarnessError, MissingFileError
from harness.data import DATASETS, eval_subset, load_split

SYNSETS = ("n01440764", "n01443537", "n09468604")  # tench, goldfish, valley: class indices 0, 1 and 979


def _image(path: Path, rng: np.random.RandomState, size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)


def image_folder(root: Path, per_class: int = 2) -> list[tuple[str, str]]:
    """``root/<synset>/ILSVRC2012_val_<k>.JPEG`` (and one PNG); returns (synset, file) in creation order."""
    rng = np.random.RandomState(0)
    made, k = [], 1
    for syn in reversed(SYNSETS):  # created out of order: the index must sort
        for j in range(per_class):
            name = f"ILSVRC2012_val_{k:08d}.JPEG" if j else f"ILSVRC2012_val_{k:08d}.png"
            _image(root / syn / name, rng, (300 + 17 * k, 260 + 5 * j))
            made.append((syn, name))
            k += 1
    return made


def test_imagenet_is_registered_with_the_papers_shape_and_budget():
    from threat_models.specs import THREATS

    for name, n in (("imagenet", 512), ("imagenet-rb5000", 5000)):
        info = DATASETS.get(name)
        assert (info.family, info.num_classes, info.image_shape, info.default_n, info.needs_data_dir) == (
            "imagenet", 1000, (3, 224, 224), n, True)
    spec = THREATS.get("adaptive").resolve("imagenet")
    assert spec.eps == pytest.approx(4 / 255) and spec.steps == 200 and spec.eot_samples == 20
    assert THREATS.get("preprocessor-blind").resolve("imagenet", {"norm": "l2"}).eps == 3.0


def test_the_canonical_synsets_and_robustbenchs_list_are_read_offline():
    syn = I.synsets()
    assert len(syn) == 1000 and list(syn) == sorted(syn) and syn[0] == "n01440764" and syn.index("n09468604") == 979
    ids = I.robustbench_ids()
    assert len(ids) == 5000 == len(set(ids)) and all(i.split("/")[0] in syn for i in ids)
    assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"


def test_image_folder_layout_in_imagefolder_order_with_the_1000_class_labels(tmp_path):
    from PIL import Image
    from torchvision import datasets, transforms

    image_folder(tmp_path / "val")
    for where in (tmp_path, tmp_path / "val"):  # RobustBench's data_dir (holding val/) or the folder itself
        x, y = load_split("imagenet", "test", where)
        assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.tolist() == [0, 0, 1, 1, 979, 979]
    ref = datasets.ImageFolder(str(tmp_path / "val"), transform=transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]))
    assert [Path(p).name for p, _ in ref.samples] == [Path(f).name for f in I.load_index("imagenet", "test", tmp_path).files]
    for i in range(len(ref)):  # torchvision's own pipeline, pixel for pixel
        assert torch.equal(ref[i][0], x[i])
    # DiffPure's subsets: RandomState(data_seed).choice(len, n, replace=False) over this order
    sub = eval_subset("imagenet", n=3, data_seed=5, data_dir=tmp_path)
    assert np.array_equal(sub.indices, np.random.RandomState(5).choice(6, 3, replace=False))
    assert torch.equal(sub.x, x[torch.from_numpy(sub.indices)]) and torch.equal(sub.y, y[torch.from_numpy(sub.indices)])
    src = sub.identity["source"]
    assert src["kind"] == "imagefolder" and src["images"] == 6 and src["list"] == "all"
    assert src["transform"] == "resize256-centercrop224" and len(src["images_sha256"]) == 64
    # another draw reads other files: another images_sha256, the same index sha256
    other = eval_subset("imagenet", n=3, data_seed=6, data_dir=tmp_path).identity["source"]
    assert other["sha256"] == src["sha256"] and other["images_sha256"] != src["images_sha256"]
    with Image.open(tmp_path / "val" / "n01440764" / "ILSVRC2012_val_00000005.png") as im:
        assert im.size == (385, 260)  # non-square and larger than 256: resize then crop both matter


def _flat(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    made = image_folder(tmp_path / "tmpfolder")
    flat = tmp_path / "flat"
    flat.mkdir()
    for syn, name in made:
        (tmp_path / "tmpfolder" / syn / name).rename(flat / name)
    return flat, made


@pytest.mark.parametrize("truth", ["val.txt", "LOC_val_solution.csv", "ILSVRC2012_devkit_t12"])
def test_flat_validation_folder_with_each_ground_truth(tmp_path, truth):
    flat, made = _flat(tmp_path)
    syn = I.synsets()
    if truth == "val.txt":
        (flat / truth).write_text("".join(f"{n} {syn.index(s)}\n" for s, n in made))
    elif truth == "LOC_val_solution.csv":
        with open(tmp_path / truth, "w", newline="") as f:  # beside the folder
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            w.writerows([[Path(n).stem, f"{s} 1 2 3 4"] for s, n in made])
    else:
        import scipy.io

        data = tmp_path / truth / "data"
        data.mkdir(parents=True)
        fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
        rows = np.empty((4, 1), dtype=[(f, "O") for f in fields])
        for i, (ident, wnid, kids) in enumerate([(10, SYNSETS[0], 0), (11, SYNSETS[1], 0), (12, SYNSETS[2], 0), (1001, "n00001740", 3)]):
            rows[i, 0] = (ident, wnid, "w", "g", kids, np.array([]), 0, 0)
        scipy.io.savemat(str(data / "meta.mat"), {"synsets": rows})
        ids = {SYNSETS[0]: 10, SYNSETS[1]: 11, SYNSETS[2]: 12}
        order = sorted(made, key=lambda m: m[1])  # the devkit file lists the images by number
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[s]}\n" for s, _ in order))
    index = I.load_index("imagenet", "test", flat)
    assert index.source["kind"] == "ilsvrc2012-flat" and index.source["ground_truth"] == truth
    # the order of the same images in synset folders (ImageFolder's), and their labels
    assert list(index.files) == [n for _, n in sorted(made)] and index.y.tolist() == [0, 0, 1, 1, 979, 979]
    x, _ = load_split("imagenet", "test", flat)
    assert x.shape == (6, 3, 224, 224)


def test_robustbench_list_in_its_order_and_its_missing_images_named(tmp_path, monkeypatch):
    image_folder(tmp_path)
    with pytest.raises(MissingFileError) as err:  # the real list: 5000 images this folder does not have
        I.load_index("imagenet-rb5000", "test", tmp_path)
    assert "lacks 5000 of RobustBench's 5000" in str(err.value) and "n09468604/ILSVRC2012_val_00015253.JPEG" in str(err.value)
    wanted = ("n09468604/ILSVRC2012_val_00000002.JPEG", "n01440764/ILSVRC2012_val_00000005.png",
              "n01443537/ILSVRC2012_val_00000004.JPEG")
    monkeypatch.setattr(I, "robustbench_ids", lambda: wanted)
    index = I.load_index("imagenet-rb5000", "test", tmp_path)  # (a failed scan is not cached)
    assert index.files == wanted and index.y.tolist() == [979, 0, 1] and index.source["list"] == "robustbench-5000"
    assert index.source["images_in_folder"] == 6


def test_missing_or_malformed_data_is_a_one_line_error_saying_what_to_supply(tmp_path):
    with pytest.raises(HarnessError, match="needs --data-dir: the ILSVRC2012 validation set"):
        eval_subset("imagenet", n=1)
    with pytest.raises(MissingFileError) as err:
        eval_subset("imagenet", n=1, data_dir=tmp_path / "nowhere")
    assert "\n" not in str(err.value) and "does not exist: supply the ILSVRC2012 validation set" in str(err.value)
    with pytest.raises(HarnessError, match="only split 'test'"):
        load_split("imagenet", "train", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="neither an ImageNet ImageFolder"):
        eval_subset("imagenet", n=1, data_dir=tmp_path / "empty")
    flat, _ = _flat(tmp_path)
    with pytest.raises(MissingFileError, match="no ground truth"):
        eval_subset("imagenet", n=1, data_dir=flat)
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 1200\n")
    with pytest.raises(HarnessError, match="line 1"):
        eval_subset("imagenet", n=1, data_dir=flat)
    (tmp_path / "odd" / "n99999999").mkdir(parents=True)
    with pytest.raises(HarnessError, match="not ImageNet-1k synsets: n99999999"):
        eval_subset("imagenet", n=1, data_dir=tmp_path / "odd")
    image_folder(tmp_path / "broken")
    (tmp_path / "broken" / SYNSETS[0] / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(HarnessError, match="cannot read image"):
        load_split("imagenet", "test", tmp_path / "broken")
