"""Classifier registry: shipped CNNs, CIFAR ResNets (real checkpoints), RobustBench offline, training."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import harness.classifiers as hc
from harness.classifiers import (
    CLASSIFIERS,
    KNOWN_RESNET_CHECKPOINTS,
    CifarResNet,
    default_classifier,
    load_classifier,
)
from harness.data import load_split
from harness.core.registry import HarnessError

RESNET_FILES = {name: fname for name, fname in KNOWN_RESNET_CHECKPOINTS.values()}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shared() -> Path:
    """The shared folder with real CIFAR data and checkpoints.

    Skipped when HARNESS_SHARED is unset (a developer machine without it); when it is
    set (CI), a missing file is a failure, not a skip.
    """
    root = os.environ.get("HARNESS_SHARED")
    if not root:
        pytest.skip("HARNESS_SHARED is not set: real CIFAR data and ResNet checkpoints unavailable")
    return Path(root)


def _shared_file(shared: Path, rel: str) -> Path:
    path = shared / rel
    assert path.is_file(), f"HARNESS_SHARED={shared} is set but '{rel}' is missing there"
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _accuracy(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    with torch.no_grad():
        return sum((module(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch)) / len(x)


# --------------------------------------------------------------------------- registry basics
def test_registry_entries_and_defaults():
    names = CLASSIFIERS.names()
    for n in ("digits-cnn", "mnist5k-cnn", "resnet20", "resnet32", "resnet44", "resnet56", "rb:<ModelName>"):
        assert n in names
    assert CLASSIFIERS.get("resnet20").needs_weights and not CLASSIFIERS.get("digits-cnn").needs_weights
    assert CLASSIFIERS.get("digits-cnn").datasets == ("digits",)
    assert default_classifier("digits") == "digits-cnn"
    assert default_classifier("mnist5k") == "mnist5k-cnn"
    with pytest.raises(HarnessError, match="pass --classifier.*resnet20 --weights.*rb:Standard --model-dir"):
        default_classifier("cifar10")
    with pytest.raises(HarnessError, match="did you mean 'digits'"):
        default_classifier("digts")


def test_unknown_classifier_and_wrong_dataset():
    with pytest.raises(HarnessError, match="unknown classifier 'resnt20'; did you mean 'resnet20'"):
        load_classifier("resnt20", dataset="cifar10")
    with pytest.raises(HarnessError, match="does not apply to dataset 'cifar10'"):
        load_classifier("digits-cnn", dataset="cifar10")


# --------------------------------------------------------------------------- shipped small CNNs
@pytest.mark.parametrize("name, dataset", [("digits-cnn", "digits"), ("mnist5k-cnn", "mnist5k")])
def test_shipped_cnn_accuracy_and_recipe(name, dataset):
    pt = hc.WEIGHTS_DIR / f"{name}.pt"
    recipe = json.loads((hc.WEIGHTS_DIR / f"{name}.json").read_text())
    assert pt.stat().st_size < 500_000
    assert recipe["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    clf = load_classifier(name, dataset=dataset)
    assert not clf.module.training and not any(p.requires_grad for p in clf.module.parameters())
    assert clf.sha256 == recipe["sha256"] and clf.identity == {"name": name, "arch": recipe["arch"], "sha256": clf.sha256}
    json.dumps(clf.identity)
    x, y = load_split(dataset, "test")
    acc = _accuracy(clf.module, x, y)
    assert acc >= 0.95
    assert acc == pytest.approx(recipe["clean_test_accuracy"], abs=5e-3)  # reproducible (a CPU with other kernels may flip an image or two)


def test_missing_shipped_weights_names_file_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(HarnessError) as exc:
        load_classifier("digits-cnn", dataset="digits")
    msg = str(exc.value)
    assert str(tmp_path / "digits-cnn.pt") in msg and "harness train classifier --dataset digits" in msg


def test_shipped_weights_must_match_their_json(tmp_path, monkeypatch):
    shutil.copy(hc.WEIGHTS_DIR / "digits-cnn.pt", tmp_path / "digits-cnn.pt")
    rec = json.loads((hc.WEIGHTS_DIR / "digits-cnn.json").read_text())
    rec["sha256"] = "0" * 64
    (tmp_path / "digits-cnn.json").write_text(json.dumps(rec))
    monkeypatch.setattr(hc, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(HarnessError, match="do not match the sha256"):
        load_classifier("digits-cnn", dataset="digits")


def test_weights_override_and_weights_only(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    own = tmp_path / "mine.pt"
    torch.manual_seed(1)
    torch.save(hc.SMALL_CNNS["digits-cnn"].build().state_dict(), own)
    clf = load_classifier("digits-cnn", dataset="digits", weights=own)
    assert clf.sha256 == hashlib.sha256(own.read_bytes()).hexdigest() and clf.info["shipped"] is False
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


class _NotATensor:
    """Any non-tensor class: a weights_only load refuses to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _NotATensor()}, bad)
    with pytest.raises(HarnessError, match="cannot load weights") as exc:
        load_classifier("digits-cnn", dataset="digits", weights=bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(HarnessError, match="cannot load weights"):
        load_classifier("resnet20", dataset="cifar10", weights=bad)


# --------------------------------------------------------------------------- CIFAR ResNets (synthetic weights)
def test_resnet_needs_weights(tmp_path):
    with pytest.raises(HarnessError, match="classifier 'resnet20' needs --weights PATH"):
        load_classifier("resnet20", dataset="cifar10")
    missing = tmp_path / "resnet20-12fca82f.th"
    with pytest.raises(HarnessError, match=f"weights file '{missing}' does not exist"):
        load_classifier("resnet20", dataset="cifar10", weights=missing)


def test_resnet_user_weights_formats(tmp_path):
    torch.manual_seed(0)
    state = CifarResNet(20).state_dict()
    # Idelbayev format: {'best_prec1', 'state_dict'} with DataParallel's `module.` prefix.
    wrapped = tmp_path / "wrapped.th"
    torch.save({"best_prec1": 12.5, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    # A bare state_dict without the prefix.
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for path in (wrapped, bare):
        clf = load_classifier("resnet20", dataset="cifar10", weights=path)
        assert clf.identity["known_checkpoint"] is False
        assert clf.identity["sha256"] == clf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert not clf.module.training
        with torch.no_grad():
            outs.append(clf.module(x))
    assert torch.allclose(outs[0], outs[1]) and outs[0].shape == (2, 10)
    # A 100-class head for CIFAR-100 with the user's own weights.
    c100 = tmp_path / "c100.pt"
    torch.save(CifarResNet(20, num_classes=100).state_dict(), c100)
    assert load_classifier("resnet20", dataset="cifar100", weights=c100).module(x).shape == (2, 100)


def test_resnet_wrong_architecture_is_one_line(tmp_path):
    path = tmp_path / "r32.pt"
    torch.save(CifarResNet(32).state_dict(), path)
    with pytest.raises(HarnessError, match="do not fit CifarResNet: keys .* unexpected") as exc:
        load_classifier("resnet20", dataset="cifar10", weights=path)
    assert "\n" not in str(exc.value)
    with pytest.raises(HarnessError, match=r"'linear.weight' has shape \(10, 64\), expected \(100, 64\)"):
        load_classifier("resnet32", dataset="cifar100", weights=path)


def test_resnet_sha_prefix_in_name_is_checked(tmp_path):
    path = tmp_path / "resnet20-deadbeef.th"
    torch.save(CifarResNet(20).state_dict(), path)
    with pytest.raises(HarnessError, match=r"sha256 mismatch for 'resnet20-deadbeef.th': expected prefix deadbeef, got [0-9a-f]{64}"):
        load_classifier("resnet20", dataset="cifar10", weights=path)
    # A name carrying the right prefix loads.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = tmp_path / f"resnet20-{digest[:8]}.th"
    path.rename(good)
    assert load_classifier("resnet20", dataset="cifar10", weights=good).sha256 == digest


# --------------------------------------------------------------------------- CIFAR ResNets (real checkpoints)
@pytest.mark.parametrize("arch, low, high", [("resnet20", 0.91, 0.92), ("resnet32", 0.92, 0.935)])
def test_real_resnet_clean_accuracy(shared, arch, low, high):
    """Published numbers on the first 1017 CIFAR-10 test images: 91.64% and 92.82%."""
    ckpt = _shared_file(shared, f"models/{RESNET_FILES[arch]}")
    data = _shared_file(shared, "data/cifar10_test_first1017.npz")
    clf = load_classifier(arch, dataset="cifar10", weights=ckpt)
    assert clf.identity["known_checkpoint"] is True and clf.identity["sha256"].startswith(ckpt.stem.split("-")[1])
    assert str(shared) not in json.dumps(clf.identity)  # where the user keeps it is not part of the identity
    x, y = load_split("cifar10", "test", data_dir=data)
    assert len(y) == 1017
    acc = _accuracy(clf.module, x, y)
    assert low <= acc <= high, f"{arch} clean accuracy {acc:.4f}"


def test_real_checkpoint_under_a_wrong_name(shared, tmp_path):
    ckpt = _shared_file(shared, "models/resnet20-12fca82f.th")
    wrong = tmp_path / "resnet20-12fca82e.th"
    shutil.copy(ckpt, wrong)
    with pytest.raises(HarnessError, match="sha256 mismatch for 'resnet20-12fca82e.th': expected prefix 12fca82e, got 12fca82f"):
        load_classifier("resnet20", dataset="cifar10", weights=wrong)
    # The public resnet20 file passed as resnet32 is named, not just reported as key soup.
    with pytest.raises(HarnessError, match="is the public resnet20 checkpoint, not resnet32"):
        load_classifier("resnet32", dataset="cifar10", weights=ckpt)
    renamed = tmp_path / "my_model.th"  # no hash in the name: still recognised by its digest
    shutil.copy(ckpt, renamed)
    assert load_classifier("resnet20", dataset="cifar10", weights=renamed).identity["known_checkpoint"] is True


# --------------------------------------------------------------------------- RobustBench
def test_robustbench_offline_error_names_the_file(tmp_path, no_network):
    expected = tmp_path / "cifar10" / "Linf" / "Standard.pt"
    with pytest.raises(HarnessError) as exc:
        load_classifier("rb:Standard", dataset="cifar10", model_dir=tmp_path)
    assert str(expected) in str(exc.value) and "\n" not in str(exc.value)
    assert not expected.exists()
    with pytest.raises(HarnessError, match=str(tmp_path / "cifar100" / "Linf" / "Gowal2020Uncovering.pt")):
        load_classifier("rb:Gowal2020Uncovering", dataset="cifar100", model_dir=tmp_path)
    with pytest.raises(HarnessError, match="did you mean 'Standard'"):
        load_classifier("rb:Standart", dataset="cifar10", model_dir=tmp_path)
    with pytest.raises(HarnessError, match="does not apply to dataset 'digits'"):
        load_classifier("rb:Standard", dataset="digits", model_dir=tmp_path)


def test_robustbench_loads_a_supplied_checkpoint(tmp_path, no_network):
    """The happy path offline, with random weights for the smallest CIFAR-10 Linf model."""
    rb_utils = hc._import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Ding2020MMA"  # a WRN-28-4, the smallest single model of the zoo
    torch.manual_seed(0)
    model = rb_utils.all_models[BenchmarkDataset.cifar_10][ThreatModel.Linf][name]["model"]()
    path = tmp_path / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict()}, path)
    clf = load_classifier(f"rb:{name}", dataset="cifar10", model_dir=tmp_path)
    assert clf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == clf.identity["sha256"]
    assert clf.identity["arch"] == f"robustbench:cifar10/Linf/{name}"
    assert not clf.module.training and not any(p.requires_grad for p in clf.module.parameters())
    with torch.no_grad():
        assert clf.module(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- training
def test_train_classifier_writes_loadable_weights(tmp_path):
    from harness.training.classifier import train_classifier
    from harness.training import TRAINERS

    rec = train_classifier("digits", epochs=2, seed=1, out=tmp_path)
    pt = tmp_path / "digits-cnn.pt"
    assert json.loads((tmp_path / "digits-cnn.json").read_text()) == rec
    assert rec["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert rec["epochs"] == 2 and rec["seed"] == 1 and rec["split"] == {**rec["split"], "train": 1347, "test": 450}
    for key in ("optimizer", "lr", "batch_size", "torch_version", "train_time_s", "clean_test_accuracy"):
        assert key in rec
    clf = load_classifier("digits-cnn", dataset="digits", weights=pt)
    assert clf.info["clean_test_accuracy"] == rec["clean_test_accuracy"]  # recipe found beside the file
    # Seeded: the same arguments give byte-identical weights.
    again = train_classifier("digits", epochs=2, seed=1, out=tmp_path / "again")
    assert again["sha256"] == rec["sha256"]

    trainer = TRAINERS.get("classifier")
    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    args = parser.parse_args(["--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "cli")])
    assert trainer.run(args) == 0 and (tmp_path / "cli" / "digits-cnn.pt").is_file()
    with pytest.raises(HarnessError, match="no classifier recipe for dataset 'cifar10'"):
        train_classifier("cifar10")
