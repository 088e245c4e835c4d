"""ImageNet without ImageNet: the data layouts on small folders the tests build, the classifiers, the paper grid.

The folders hold a few random images under real synset names (sizes other than 224 and
non-square, so the resize and crop matter). The classifiers are built and saved here
with random weights under the published file names; their sha256 then does not match
the published prefix, which the loaders must refuse unless the test patches the table.
"""

from __future__ import annotations

import csv
import json
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


# --------------------------------------------------------------------------- classifiers
def test_the_published_files_are_torchvisions_and_deits():
    import torchvision.models as tvm

    from harness.classifiers import IMAGENET_WEIGHTS

    pairs = {"resnet50-v1": tvm.ResNet50_Weights.IMAGENET1K_V1, "resnet50-v2": tvm.ResNet50_Weights.IMAGENET1K_V2,
             "wide-resnet50-2-v1": tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
             "wide-resnet50-2-v2": tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V2}
    for name, enum in pairs.items():
        w = IMAGENET_WEIGHTS[name]
        assert w.url == enum.url and w.top1 == enum.meta["_metrics"]["ImageNet-1K"]["acc@1"], name
    assert IMAGENET_WEIGHTS["deit-s"].sha256_prefix == "cd65a155"


def test_deit_s_has_the_hub_files_keys():
    """The keys of facebookresearch/deit's deit_small_patch16_224 file (timm 0.3's VisionTransformer)."""
    from harness.classifiers import IMAGENET_WEIGHTS

    net = IMAGENET_WEIGHTS["deit-s"].build()  # (timm's initialisation reads values: no meta device)
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    want = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
            + [f"blocks.{i}.{k}" for i in range(12) for k in block] + ["norm.weight", "norm.bias", "head.weight", "head.bias"])
    sd = net.state_dict()
    assert sorted(sd) == sorted(want)
    assert tuple(sd["pos_embed"].shape) == (1, 197, 384) and tuple(sd["head.weight"].shape) == (1000, 384)
    assert sum(v.numel() for v in sd.values()) == 22_050_664


def _published_as(monkeypatch, name: str, path: Path) -> None:
    """Let the test's random weights pass for the published file (its sha256 prefix written into the table)."""
    import dataclasses

    from harness import classifiers as C
    from harness.core.env import sha256_file

    w = C.IMAGENET_WEIGHTS[name]
    stem = w.file.rsplit("-", 1)[0]
    monkeypatch.setitem(C.IMAGENET_WEIGHTS, name, dataclasses.replace(w, file=f"{stem}-{sha256_file(path)[:8]}.pth"))


@pytest.mark.parametrize("name", ["resnet50-v1", "deit-s"])
def test_imagenet_classifier_from_the_users_file_with_its_sha256_checked_and_normalisation_inside(tmp_path, monkeypatch, name):
    from harness.classifiers import IMAGENET_WEIGHTS, load_classifier

    w = IMAGENET_WEIGHTS[name]
    torch.manual_seed(0)
    net = w.build().eval()
    path = tmp_path / w.file
    torch.save({"model": net.state_dict()} if name == "deit-s" else net.state_dict(), path)  # as each is published
    with pytest.raises(HarnessError) as err:  # random weights under the published name: refused
        load_classifier(name, dataset="imagenet", weights=path)
    assert "\n" not in str(err.value) and f"not the published {w.sha256_prefix}" in str(err.value)
    _published_as(monkeypatch, name, path)
    clf = load_classifier(name, dataset="imagenet-rb5000", weights=path)
    assert not clf.module.training and not any(p.requires_grad for p in clf.module.parameters())
    assert clf.identity["sha256"] == clf.sha256 and clf.info["sha256_checked"].startswith("prefix")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(clf.module(x), net((x - mean) / std))
    assert clf.module(x).shape == (1, 1000)


def test_a_missing_classifier_file_names_the_file_and_where_it_is_published(tmp_path):
    from harness.classifiers import load_classifier

    with pytest.raises(MissingFileError) as err:
        load_classifier("wide-resnet50-2-v1", dataset="imagenet", weights=tmp_path / "models" / "wide_resnet50_2-95faca4d.pth")
    msg = str(err.value)
    assert "\n" not in msg and "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg
    assert "Wide_ResNet50_2_Weights.IMAGENET1K_V1" in msg
    with pytest.raises(HarnessError, match="needs --weights PATH to deit_small_patch16_224-cd65a155.pth"):
        load_classifier("deit-s", dataset="imagenet")
    with pytest.raises(HarnessError, match="does not apply to dataset 'cifar10'"):
        load_classifier("resnet50-v2", dataset="cifar10", weights=tmp_path / "x.pth")
    from harness.classifiers import default_classifier

    with pytest.raises(HarnessError, match="--classifier resnet50-v1 --weights PATH/resnet50-0676ba61.pth"):
        default_classifier("imagenet")


def test_robustbench_imagenet_models_offline_from_the_model_dir(tmp_path):
    from harness.classifiers import load_classifier

    with pytest.raises(MissingFileError) as err:
        load_classifier("rb:Salman2020Do_R50", dataset="imagenet", model_dir=tmp_path)
    assert str(tmp_path / "imagenet" / "Linf" / "Salman2020Do_R50.pt") in str(err.value)
    with pytest.raises(HarnessError, match="use --classifier resnet50-v1"):
        load_classifier("rb:Standard_R50", dataset="imagenet", model_dir=tmp_path)
    with pytest.raises(HarnessError, match="expects its 'Crop288' preprocessing"):
        load_classifier("rb:Wong2020Fast", dataset="imagenet-rb5000", model_dir=tmp_path)


# --------------------------------------------------------------------------- the paper grid and the published table
REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "grids" / "paper-imagenet.yaml"


def test_published_imagenet_rows_name_exactly_one_grid_cell_run_as_the_papers_did():
    from harness.store.check import load_table
    from tests.test_ncsnpp import _matches, grid_cells

    load_table(REPO / "tables" / "published.csv")
    rows = [r for r in csv.DictReader((REPO / "tables" / "published.csv").open()) if r["dataset"] == "imagenet"]
    cells = grid_cells(GRID)
    assert len(rows) == 12 and len(cells) == 14  # 17 cells, of which 3 AutoAttack-standard ones are refused
    for row in rows:
        found = [c for c in cells if _matches(row, c)]
        assert len(found) == 1, row
        cell = found[0]
        d, spec = cell["defense"], cell["spec"]
        if row["defense"] == "diffpure":
            assert d.backbone == "guided-diffusion" and d.model_path.endswith("256x256_diffusion_uncond.pt")
            assert (d.t_star, d.dt) == (0.15, 0.001)
        if row["threat"] == "adaptive":  # DiffPure's table: AutoAttack-rand through the adjoint, at its eps, on 512
            assert spec.attacks == ("autoattack-rand",) and cell["plan"].main_path.value == "adjoint"
            assert (spec.eps, spec.eot_samples, spec.apgd_steps, cell["n"]) == (0.0157, 20, 100, 512)
            assert not cell["plan"].also_paths
        else:  # MAEP's transfer table: AutoAttack-standard on the classifier, ResNet-50 V2
            assert [p.label for p in cell["plan"].attacks][:1] == ["apgd-ce"] and cell["plan"].main_path.value == "classifier"
            assert row["classifier"] == "resnet50-v2"
        if row["defense"] == "maep":
            assert (d.trained_on, d.adapter, spec.paired_reference) == ("cifar10", "tile", False)
    # the harness's own adaptive threat: exact gradient then BPDA, on the diffusion purifiers' 64 images, at 4/255
    own = [c for c in cells if c["cfg"].threat == "adaptive" and "autoattack-rand" not in c["spec"].attacks]
    assert len(own) == 3 and all(c["n"] == 64 and c["plan"].main_path.value == "full" for c in own)
    assert all(c["spec"].eps == pytest.approx(4 / 255) for c in own)
    assert {c["cfg"].classifier for c in own} == {"resnet50-v1", "wide-resnet50-2-v1", "deit-s"}


def test_paper_grid_dry_run_lists_every_cell_with_its_cost_and_names_the_missing_files(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["grid", str(GRID), "--dry-run", "--db", str(tmp_path / "dry.db")]) == 0
    out = capsys.readouterr().out.splitlines()
    cells = [ln for ln in out if ln.startswith("  skip ")]
    costs = [ln for ln in out if ln.startswith("        nfe once its files are there:")]
    assert len(cells) == 17 and len(costs) == 14
    reasons = [ln.split("]  (", 1)[-1] for ln in cells]
    ckpt = [r for r in reasons if "256x256_diffusion_uncond.pt' (=" in r]
    data = [r for r in reasons if "ImageNet data dir 'data/imagenet/val' does not exist" in r]
    refused = [r for r in reasons if "autoattack-standard" in r]
    assert (len(ckpt), len(data), len(refused)) == (10, 4, 3)
    assert all(G_URL in r for r in ckpt) and all("ILSVRC2012_devkit_t12" in r for r in data)
    # DiffPure's 150 solver steps per purification, MAEP's one pass
    assert sum(" x 150 NFE = " in c for c in costs) == 10 and sum(" x 1 NFE = " in c for c in costs) == 4
    assert any(ln.startswith("skipped for missing files: 14 cells") for ln in out)


G_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"


def test_grid_filters_a_defense_by_classifier_and_sizes_a_threat_entry(tmp_path):
    from harness.scheduler import load_grid
    from harness.scheduler.cells import check_names, expand
    from harness.scheduler.gridfile import GridError

    text = """n_examples: 32
defenses:
  - none
  - {name: maep, classifiers: [digits-cnn]}
threats:
  - preprocessor-blind
  - {name: bpda, n_examples: 8}
datasets: [digits]
classifiers:
  - digits-cnn
  - {name: resnet20, weights: x.th, datasets: [digits]}
"""
    (tmp_path / "g.yaml").write_text(text)
    cells = expand(load_grid(tmp_path / "g.yaml"))
    assert sorted((c.defense, c.classifier, c.threat, c.n_examples) for c in cells) == sorted(
        [(d, clf, t, 8 if t == "bpda" else 32) for d, clf in (("none", "digits-cnn"), ("none", "resnet20"), ("maep", "digits-cnn"))
         for t in ("preprocessor-blind", "bpda")])
    (tmp_path / "g.yaml").write_text(text.replace("classifiers: [digits-cnn]}", "classifiers: [digit-cnn]}"))
    with pytest.raises(GridError, match="'digit-cnn' is not in the grid's classifiers"):
        check_names(load_grid(tmp_path / "g.yaml"))


def test_harness_run_drives_diffpure_with_guided_diffusion_on_an_imagenet_folder(shared_dir, tmp_path, monkeypatch, capsys):
    """``harness run`` end to end, as a user with the files would: folder, classifier file, checkpoint (reduced here)."""
    if shared_dir is None:
        pytest.skip("HARNESS_SHARED is not set (CI sets it): the guided-diffusion fixtures are unavailable")
    from harness.classifiers import IMAGENET_WEIGHTS
    from harness.cli import main
    from harness.core.env import sha256_file
    from tests.test_guided_diffusion import save_checkpoint

    image_folder(tmp_path / "val")
    ckpt = save_checkpoint(shared_dir / "fixtures" / "guided_diffusion", tmp_path / "gd" / "uncond32.pt")
    w = IMAGENET_WEIGHTS["resnet50-v1"]
    torch.manual_seed(0)
    weights = tmp_path / w.file
    torch.save(w.build().state_dict(), weights)
    _published_as(monkeypatch, "resnet50-v1", weights)
    db = str(tmp_path / "r.db")
    argv = ["run", "--defense", "diffpure", "--threat", "preprocessor-blind", "--dataset", "imagenet",
            "--data-dir", str(tmp_path / "val"), "--classifier", "resnet50-v1", "--weights", str(weights),
            "--n-examples", "2", "--set", f"model_path={ckpt}", "--set", "backbone=guided-diffusion",
            "--set", "t_star=0.02", "--set", "dt=0.01", "--set", "steps=1", "--set", "eval_draws=1", "--db", db, "--json"]
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    out = json.loads(cap.out)
    assert out["status"] == "done" and out["n_examples"] == 2
    assert main(["show", out["job_id"], "--db", db]) == 0
    ident = json.loads(capsys.readouterr().out)["identity"]
    assert ident["defense"]["backbone_source"]["file_sha256"] == sha256_file(ckpt)
    assert ident["classifier"]["sha256"] == sha256_file(weights) and ident["dataset"]["source"]["kind"] == "imagefolder"
    assert ident["threat"]["eps"] == pytest.approx(4 / 255)
