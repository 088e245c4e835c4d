"""Classifier registry: the models a defense protects.

Every classifier takes float32 NCHW images in [0, 1]; normalisation is inside the
module (registered buffers), so attacks clip to [0, 1] and to the eps-ball without
knowing about preprocessing. Entries of :data:`CLASSIFIERS`:

- ``digits-cnn``, ``mnist5k-cnn``: small CNNs whose weights ship in
  ``harness/weights/<name>.pt`` (a state_dict) with a ``<name>.json`` recipe beside it.
  ``harness train classifier --dataset digits`` reproduces them.
- ``resnet20`` .. ``resnet56``: the CIFAR ResNets of He et al. (2016) in the layout of
  Yerlan Idelbayev's checkpoints (``module.`` keys, option-A shortcuts); the weights
  file is required (``--weights``) and its sha256 is checked against the name.
- ``resnet50-v1``, ``resnet50-v2``, ``wide-resnet50-2-v1``, ``wide-resnet50-2-v2``
  (torchvision's ImageNet weights; ``v1`` is ``pretrained=True``, DiffPure's and Lee &
  Kim's ResNet-50 and DiffPure's WRN-50-2; MAEP's 80.85% ResNet-50 is ``v2``) and
  ``deit-s`` (DeiT-S, ``deit_small_patch16_224``, DiffPure's ``torch.hub`` model, built
  with timm): ImageNet classifiers from the user's ``--weights`` file, whose sha256 must
  start with the published prefix in its file name (torch.hub's own check; the full
  digests are not published), with ImageNet's normalisation inside.
- ``rb:<ModelName>``: any RobustBench CIFAR-10/100 or ImageNet Linf model, loaded offline
  from ``--model-dir`` (``{model_dir}/{dataset}/Linf/{ModelName}.pt``; ``imagenet`` for
  both ImageNet datasets).

:func:`load_classifier` returns a :class:`LoadedClassifier` in eval mode with frozen
parameters; its ``identity`` (name, architecture, weights sha256) enters the job hash.
"""

from __future__ import annotations

import hashlib
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.env import WEIGHTS_DIR, sha256_file
from harness.data import DATASETS
from harness.core.config import read_recipe
from harness.core.registry import HarnessError, MissingFileError, Registry, first_line, suggest

#: Where the shipped small-CNN weights live (inside the package).

#: sha256 of the public CIFAR-10 ResNet checkpoints (Idelbayev, BSD-2-Clause), as in
#: ``$HARNESS_SHARED/models/SHA256SUMS``: digest -> (architecture, file name).
KNOWN_RESNET_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8": ("resnet20", "resnet20-12fca82f.th"),
    "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850": ("resnet32", "resnet32-d509ac18.th"),
    "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4": ("resnet44", "resnet44-014dd654.th"),
    "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367": ("resnet56", "resnet56-4bfd9763.th"),
}
_CHECKPOINT_NAME = re.compile(r"^(resnet\d+)-([0-9a-fA-F]{6,64})\.th$")

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
#: torchvision's ImageNet normalisation (DiffPure wraps all three of its ImageNet classifiers in it).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



# --------------------------------------------------------------------------- modules
class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std as (non-persistent) buffers.

    Non-persistent so the checkpoints hold only learned weights (the public ResNet
    files have no normalisation entries, and strict loading must accept them).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """A plain CNN for the bundled grey-scale datasets: (conv3x3-ReLU-maxpool2) blocks, then a linear layer.

    No BatchNorm or dropout, so train and eval mode compute the same function and the
    gradients an attacker sees are those of the evaluated model.

    Args:
        in_channels: Image channels.
        image_size: Height (= width) of the input.
        widths: Output channels of each block; each block halves the resolution.
        num_classes: Number of logits.
        mean, std: Per-channel normalisation applied inside ``forward``.

    Shape:
        input ``(N, in_channels, image_size, image_size)`` in [0, 1]; output ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        widths: tuple[int, ...],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        prev, size = in_channels, image_size
        for w in widths:
            layers += [nn.Conv2d(prev, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev, size = w, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))


@dataclass(frozen=True)
class SmallCNNSpec:
    """How to build one shipped small CNN (also recorded in its json recipe)."""

    name: str
    dataset: str
    widths: tuple[int, ...]
    #: Normalisation constants: pixel mean/std of the dataset's train split, rounded.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Bumped whenever the architecture changes, so old job hashes do not collide.
    arch_version: str = "1"

    @property
    def arch(self) -> str:
        return f"SmallCNN(widths={list(self.widths)})-v{self.arch_version}"

    def build(self) -> SmallCNN:
        info = DATASETS.get(self.dataset)
        c, h, _ = info.image_shape
        return SmallCNN(c, h, self.widths, info.num_classes, self.mean, self.std)


SMALL_CNNS: dict[str, SmallCNNSpec] = {
    "digits-cnn": SmallCNNSpec("digits-cnn", "digits", (32, 64), mean=(0.305,), std=(0.376,)),
    "mnist5k-cnn": SmallCNNSpec("mnist5k-cnn", "mnist5k", (32, 64, 64), mean=(0.131,), std=(0.308,)),
}


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), laid out as in Idelbayev's ``resnet.py``.

    Depth ``6n + 2``: a 3x3 stem, three stages of ``n`` basic blocks (16, 32, 64
    channels; stride 2 at the start of stages 2 and 3), global average pooling and a
    linear layer. The parameter names (``conv1``, ``layer1.0.bn2``, ``linear``...) are
    those of the public checkpoints after stripping ``module.``.

    Shape:
        input ``(N, 3, 32, 32)`` in [0, 1]; output ``(N, num_classes)``.
    """

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise HarnessError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(_BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------- registry
@dataclass
class LoadedClassifier:
    """A classifier ready for evaluation.

    Attributes:
        name: Registry name (``rb:<Model>`` for RobustBench).
        module: The model: eval mode, parameters with ``requires_grad=False``, on the device.
        sha256: sha256 of the weights file, or None.
        identity: JSON-able record entering the job hash (name, arch, sha256, ...).
        info: Display-only facts (recipe, recorded clean accuracy, file name).
    """

    name: str
    module: nn.Module
    sha256: str | None
    identity: dict
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClassifierEntry:
    """One registered classifier.

    Attributes:
        name: Registry key.
        datasets: Datasets it applies to.
        description: One line for ``harness ls``.
        needs_weights: Whether the user must supply a weights file or model folder.
        load: ``load(name, dataset, weights, model_dir, device) -> LoadedClassifier``.
    """

    name: str
    datasets: tuple[str, ...]
    description: str
    needs_weights: bool
    load: Callable[..., LoadedClassifier]


CLASSIFIERS: Registry[ClassifierEntry] = Registry("classifier")

_DEFAULTS = {"digits": "digits-cnn", "mnist5k": "mnist5k-cnn"}


def default_classifier(dataset: str) -> str:
    """The classifier used when ``--classifier`` is not given.

    Args:
        dataset: Registry name of the dataset.

    Returns:
        ``"digits-cnn"`` for digits, ``"mnist5k-cnn"`` for mnist5k.

    Raises:
        HarnessError: for CIFAR, which has no shipped classifier.
    """
    DATASETS.get(dataset)  # did-you-mean for a typo
    if DATASETS.get(dataset).family == "imagenet":
        raise HarnessError(
            f"dataset '{dataset}' has no default classifier: pass --classifier, e.g. '--classifier resnet50-v1 --weights "
            f"PATH/resnet50-0676ba61.pth' (torchvision's), deit-s, wide-resnet50-2-v1 or '--classifier rb:NAME --model-dir DIR'"
        )
    if dataset not in _DEFAULTS:
        raise HarnessError(
            f"dataset '{dataset}' has no default classifier: pass --classifier, e.g. "
            f"'--classifier resnet20 --weights PATH/resnet20-12fca82f.th' or '--classifier rb:Standard --model-dir DIR'"
        )
    return _DEFAULTS[dataset]


def _finish(module: nn.Module, device: str | torch.device) -> nn.Module:
    # Frozen and in eval mode in one place: BatchNorm statistics must not move during an
    # attack, and parameter gradients would only waste memory.
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module.to(torch.device(device))


def _torch_load(path: Path) -> Any:
    try:
        # weights_only: a checkpoint from elsewhere must not be able to run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types; report one line
        raise HarnessError(f"cannot load weights '{path}': {first_line(exc)}") from None


def _strict_load(module: nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict(strict=True)`` with its multi-line error turned into one line."""
    own = module.state_dict()
    # BatchNorm fills a missing `num_batches_tracked` itself (checkpoints older than
    # PyTorch 0.4.1, such as the public CIFAR ResNets, lack it); it does not affect eval.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise HarnessError(f"weights '{path.name}' do not fit {type(module).__name__}: keys {'; '.join(parts)}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise HarnessError(
                f"weights '{path.name}' do not fit {type(module).__name__}: '{k}' has shape {shape}, expected {tuple(own[k].shape)}"
            )
    module.load_state_dict(state, strict=True)


def _check_dataset(entry: ClassifierEntry, dataset: str) -> None:
    DATASETS.get(dataset)
    if dataset not in entry.datasets:
        raise HarnessError(
            f"classifier '{entry.name}' does not apply to dataset '{dataset}' (it is for: {', '.join(entry.datasets)})"
        )


# --------------------------------------------------------------------------- small CNNs
def _load_small_cnn(name: str, dataset: str, weights, model_dir, device) -> LoadedClassifier:
    spec = SMALL_CNNS[name]
    shipped = weights is None
    path = WEIGHTS_DIR / f"{name}.pt" if shipped else Path(weights).expanduser()
    if not path.is_file():
        if shipped:
            raise MissingFileError(
                f"shipped weights '{path}' are missing; produce them with `harness train classifier --dataset {spec.dataset}`"
            )
        raise MissingFileError(f"weights file '{path}' does not exist")
    digest = sha256_file(path)
    info: dict[str, Any] = {"weights_file": path.name, "shipped": shipped}
    recipe_path = path.with_suffix(".json")
    if recipe_path.is_file():
        recipe = read_recipe(recipe_path, "classifier")
        if recipe.get("sha256") == digest:
            info["recipe"] = recipe
            info["clean_test_accuracy"] = recipe.get("clean_test_accuracy")
        elif shipped:
            # The shipped pair must agree, or the recorded accuracy describes other weights.
            raise HarnessError(
                f"shipped weights '{path.name}' do not match the sha256 in '{recipe_path.name}'; "
                f"re-create both with `harness train classifier --dataset {spec.dataset}`"
            )
    module = spec.build()
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise HarnessError(f"weights '{path}' do not hold a state_dict")
    _strict_load(module, state, path)
    identity = {"name": name, "arch": spec.arch, "sha256": digest}
    return LoadedClassifier(name, _finish(module, device), digest, identity, info)


for _name, _spec in SMALL_CNNS.items():
    CLASSIFIERS.register(
        _name,
        ClassifierEntry(
            _name, (_spec.dataset,),
            f"small CNN for {_spec.dataset}; weights ship in harness/weights/{_name}.pt (--weights overrides)",
            False, _load_small_cnn,
        ),
    )


# --------------------------------------------------------------------------- CIFAR ResNets
def _load_resnet(name: str, dataset: str, weights, model_dir, device) -> LoadedClassifier:
    if weights is None:
        raise HarnessError(
            f"classifier '{name}' needs --weights PATH (a CIFAR ResNet checkpoint such as {name}-<sha>.th)"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingFileError(f"weights file '{path}' does not exist")
    digest = sha256_file(path)
    m = _CHECKPOINT_NAME.match(path.name)
    if m and not digest.startswith(m.group(2).lower()):
        raise HarnessError(f"sha256 mismatch for '{path.name}': expected prefix {m.group(2).lower()}, got {digest}")
    known = KNOWN_RESNET_CHECKPOINTS.get(digest)
    if known and known[0] != name:
        raise HarnessError(f"'{path.name}' is the public {known[0]} checkpoint, not {name}: pass --classifier {known[0]}")
    num_classes = DATASETS.get(dataset).num_classes
    if known and num_classes != 10:
        raise HarnessError(f"'{path.name}' is a CIFAR-10 checkpoint; it cannot classify '{dataset}'")
    ckpt = _torch_load(path)
    info: dict[str, Any] = {"weights_file": path.name}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        if "best_prec1" in ckpt:
            info["best_prec1"] = float(ckpt["best_prec1"])
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict):
        state = ckpt
    else:
        raise HarnessError(f"weights '{path}' hold neither a state_dict nor a {{'state_dict': ...}} checkpoint")
    # The public files were saved from nn.DataParallel, hence the prefix.
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    module = CifarResNet(int(name[len("resnet"):]), num_classes)
    _strict_load(module, state, path)
    identity = {
        "name": name,
        "arch": f"CifarResNet(depth={name[len('resnet'):]}, shortcut=A, num_classes={num_classes})-v1",
        "sha256": digest,
        "known_checkpoint": known is not None,
    }
    return LoadedClassifier(name, _finish(module, device), digest, identity, info)


for _depth in (20, 32, 44, 56):
    CLASSIFIERS.register(
        f"resnet{_depth}",
        ClassifierEntry(
            f"resnet{_depth}", ("cifar10", "cifar100"),
            f"CIFAR ResNet-{_depth} (He et al.; Idelbayev checkpoint layout, option-A shortcut); needs --weights",
            True, _load_resnet,
        ),
    )


# --------------------------------------------------------------------------- ImageNet classifiers
@dataclass(frozen=True)
class ImageNetWeights:
    """A published ImageNet checkpoint: how to build its network and where the file comes from.

    ``file`` carries the first 8 hex digits of the file's sha256 (the torch.hub naming
    convention, which torch.hub checks on download); nothing publishes the full digest.
    """

    name: str
    arch: str
    file: str
    url: str
    source: str
    top1: float

    @property
    def sha256_prefix(self) -> str:
        """The published sha256 prefix (from the file name)."""
        return re.search(r"-([0-9a-f]{8,})\.pth$", self.file).group(1)

    def build(self) -> nn.Module:
        """The network with random weights (the file's state_dict loads into it)."""
        if self.arch == "deit_small_patch16_224":
            import timm

            return timm.create_model(self.arch, pretrained=False)
        import torchvision.models as tvm

        return getattr(tvm, self.arch)(weights=None)


def _torchvision_weights(name: str, arch: str, enum: str, member: str, top1: float) -> ImageNetWeights:
    url = f"https://download.pytorch.org/models/{_TORCHVISION_FILES[(enum, member)]}"
    return ImageNetWeights(name, arch, url.rsplit("/", 1)[1], url, f"torchvision.models.{enum}.{member}", top1)


#: torchvision's file names (``<Weights>.url``; read here without importing torchvision.models).
_TORCHVISION_FILES = {
    ("ResNet50_Weights", "IMAGENET1K_V1"): "resnet50-0676ba61.pth",
    ("ResNet50_Weights", "IMAGENET1K_V2"): "resnet50-11ad3fa6.pth",
    ("Wide_ResNet50_2_Weights", "IMAGENET1K_V1"): "wide_resnet50_2-95faca4d.pth",
    ("Wide_ResNet50_2_Weights", "IMAGENET1K_V2"): "wide_resnet50_2-9ba9bcbe.pth",
}
IMAGENET_WEIGHTS: dict[str, ImageNetWeights] = {
    w.name: w
    for w in (
        _torchvision_weights("resnet50-v1", "resnet50", "ResNet50_Weights", "IMAGENET1K_V1", 76.13),
        _torchvision_weights("resnet50-v2", "resnet50", "ResNet50_Weights", "IMAGENET1K_V2", 80.858),
        _torchvision_weights("wide-resnet50-2-v1", "wide_resnet50_2", "Wide_ResNet50_2_Weights", "IMAGENET1K_V1", 78.468),
        _torchvision_weights("wide-resnet50-2-v2", "wide_resnet50_2", "Wide_ResNet50_2_Weights", "IMAGENET1K_V2", 81.602),
        ImageNetWeights(
            "deit-s", "deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth",
            "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
            "facebookresearch/deit (torch.hub 'deit_small_patch16_224', pretrained=True; timm's original deit_small_patch16_224)",
            79.9,
        ),
    )
}
IMAGENET_DATASETS = ("imagenet", "imagenet-rb5000")


class ImageNetClassifier(nn.Module):
    """An ImageNet network behind torchvision's normalisation: [0, 1] images in, 1000 logits out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _published(w: ImageNetWeights) -> str:
    return f"{w.file}, published at {w.url} ({w.source})"


def _load_imagenet(name: str, dataset: str, weights, model_dir, device) -> LoadedClassifier:
    w = IMAGENET_WEIGHTS[name]
    if weights is None:
        raise HarnessError(f"classifier '{name}' needs --weights PATH to {_published(w)}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingFileError(f"weights file '{path}' does not exist: classifier '{name}' loads {_published(w)}")
    digest = sha256_file(path)
    if not digest.startswith(w.sha256_prefix):
        raise HarnessError(
            f"'{path.name}' has sha256 {digest[:16]}..., not the published {w.sha256_prefix}... of {w.file}: "
            f"classifier '{name}' takes only that file ({w.url})"
        )
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise HarnessError(f"weights '{path}' do not hold a state_dict")
    net = w.build()
    if w.arch == "deit_small_patch16_224":
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, net)  # the hub file's {'model': state_dict}, as timm reads it
    _strict_load(net, state, path)
    identity = {"name": name, "arch": f"ImageNetClassifier({w.arch}, torchvision normalisation)-v1", "sha256": digest,
                "published_file": w.file}
    info = {"weights_file": path.name, "published_top1": w.top1, "sha256_checked": f"prefix {w.sha256_prefix} (published)"}
    return LoadedClassifier(name, _finish(ImageNetClassifier(net), device), digest, identity, info)


for _w in IMAGENET_WEIGHTS.values():
    CLASSIFIERS.register(
        _w.name,
        ClassifierEntry(
            _w.name, IMAGENET_DATASETS,
            f"ImageNet {_w.arch} ({_w.source}, top-1 {_w.top1}%); needs --weights {_w.file}", True, _load_imagenet,
        ),
    )


# --------------------------------------------------------------------------- RobustBench
RB_PREFIX = "rb:"
_RB_THREAT = "Linf"


def _import_robustbench():
    # robustbench does `from autoattack import AutoAttack`, but the pyautoattack
    # distribution installs the module under the name `pyautoattack`.
    import pyautoattack

    sys.modules.setdefault("autoattack", pyautoattack)
    with warnings.catch_warnings():
        # Import-time deprecation noise from robustbench's dependencies (pkg_resources,
        # torch.jit.interface) says nothing about the user's run.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import robustbench.utils

    return robustbench.utils


def _load_robustbench(name: str, dataset: str, weights, model_dir, device) -> LoadedClassifier:
    model_name = name[len(RB_PREFIX):]
    if not model_name:
        raise HarnessError("classifier 'rb:' needs a RobustBench model name, e.g. rb:Standard")
    if weights is not None:
        raise HarnessError(f"classifier '{name}' takes --model-dir DIR (RobustBench layout), not --weights")
    rb_utils = _import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    ds = BenchmarkDataset("imagenet" if dataset in IMAGENET_DATASETS else dataset)
    zoo = rb_utils.all_models[ds][ThreatModel(_RB_THREAT)]
    if model_name not in zoo:
        raise HarnessError(
            f"unknown RobustBench {dataset} {_RB_THREAT} model '{model_name}'{suggest(model_name, list(zoo))}"
        )
    if ds.value == "imagenet":
        prep = zoo[model_name].get("preprocessing")
        if not zoo[model_name].get("gdrive_id"):
            # robustbench builds it with torchvision's pretrained=True, i.e. a download
            raise HarnessError(f"RobustBench's '{model_name}' is torchvision's ResNet-50: use --classifier resnet50-v1 --weights FILE")
        if prep != "Res256Crop224":
            raise HarnessError(
                f"RobustBench's '{model_name}' expects its '{prep}' preprocessing; the harness's ImageNet images are "
                f"Res256Crop224 (resize 256, crop 224)"
            )
    import timm

    if timm.is_model(f"{model_name.lower().replace('-', '_')}_{ds.value.lower()}_{_RB_THREAT.lower()}"):
        # robustbench would fetch these from the Hugging Face hub; the harness never downloads.
        raise HarnessError(f"RobustBench model '{model_name}' is hosted on the Hugging Face hub (timm) and cannot be loaded offline")
    root = Path(model_dir if model_dir is not None else "./models").expanduser()
    base = root / ds.value / _RB_THREAT / f"{model_name}.pt"
    gid = zoo[model_name]["gdrive_id"]
    # Ensembles are stored as `<Model>.pt_m0.pt`, `<Model>.pt_m1.pt`, ... (robustbench's naming).
    files = [Path(f"{base}_m{i}.pt") for i in range(len(gid))] if isinstance(gid, list) else [base]
    for f in files:
        if not f.is_file():
            # Checked before calling robustbench, which would otherwise start a download.
            raise MissingFileError(f"RobustBench checkpoint '{f}' is missing; supply that file (--model-dir {root})")
    digests = [sha256_file(f) for f in files]
    try:
        module = rb_utils.load_model(model_name=model_name, model_dir=str(root), dataset=ds.value, threat_model=_RB_THREAT)
    except Exception as exc:  # robustbench raises bare RuntimeError/KeyError/pickle errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"RobustBench could not load '{model_name}' from '{root}': {msg}") from None
    digest = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    identity = {
        "name": name,
        "arch": f"robustbench:{ds.value}/{_RB_THREAT}/{model_name}",
        "sha256": digest,
        "robustbench_version": _robustbench_version(),
    }
    info = {"weights_files": [f.name for f in files], "threat_model": _RB_THREAT}
    return LoadedClassifier(name, _finish(module, device), digest, identity, info)


def _robustbench_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("robustbench")
    except metadata.PackageNotFoundError:
        return None


CLASSIFIERS.register(
    "rb:<ModelName>",
    ClassifierEntry(
        "rb:<ModelName>", ("cifar10", "cifar100", *IMAGENET_DATASETS),
        "any RobustBench Linf model, offline from --model-dir DIR/{dataset}/Linf/<ModelName>.pt (e.g. rb:Standard; "
        "ImageNet: DIR/imagenet/Linf/, e.g. rb:Salman2020Do_R50)",
        True, _load_robustbench,
    ),
)


# --------------------------------------------------------------------------- public API
def load_classifier(
    name: str,
    *,
    dataset: str,
    weights: str | Path | None = None,
    model_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> LoadedClassifier:
    """Build a registered classifier and load its weights, offline.

    Args:
        name: Registry name (``digits-cnn``, ``resnet20``, ...) or ``rb:<ModelName>``.
        dataset: Dataset it will classify (checked against the entry, sets the class count).
        weights: Weights file: overrides the shipped file of the small CNNs; required by
            the ResNets. Always loaded with ``weights_only=True``.
        model_dir: RobustBench model folder (default ``./models``).
        device: Where the module is placed.

    Returns:
        A :class:`LoadedClassifier` in eval mode with frozen parameters.

    Raises:
        HarnessError: unknown name, wrong dataset, missing or mismatched weights.
    """
    entry = classifier_entry(name)
    _check_dataset(entry, dataset)
    return entry.load(name, dataset, weights, model_dir, device)


def classifier_entry(name: str) -> ClassifierEntry:
    """The registry entry of a classifier name (``rb:<ModelName>`` included); a did-you-mean error otherwise."""
    key = "rb:<ModelName>" if name.startswith(RB_PREFIX) else name
    if key not in CLASSIFIERS:
        real = [n for n in CLASSIFIERS.names() if not n.startswith(RB_PREFIX)]
        raise HarnessError(
            f"unknown classifier '{name}'{suggest(name, real)} (available: {', '.join(real)}, or rb:<ModelName>)"
        )
    return CLASSIFIERS.get(key)
