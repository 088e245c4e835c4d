"""The CIFAR-10 path of every trainer (`harness train diffusion|flowpure|maep|consistency --dataset cifar10`).

Each trainer runs a tiny recipe (a few steps on 24 synthetic 32x32 images, seconds) through
the same code as the shipped recipe: the images named by --data-dir (an .npz or a JPEG
.npz), the source recorded, a resumable checkpoint that continues, after a real Ctrl-C,
to exactly the uninterrupted result, and weights the defenses load. The shipped CIFAR
weights themselves are checked in tests/test_cifar_purifiers.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal

import numpy as np
import pytest
import torch

from harness.core.defense import SetupContext
from harness.core.registry import HarnessError
from harness.training.diffusion import small_unet_config

CIFAR_CTX = dict(dataset="cifar10", image_shape=(3, 32, 32), num_classes=10)
TINY_UNET = small_unet_config(32, 3, (8, 16), 4)


def _images(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    # smooth random images (a blurred colour field), so that JPEG keeps them close
    base = rng.rand(n, 4, 4, 3)
    x = np.kron(base, np.ones((1, 8, 8, 1)))
    return (x * 255).round().astype(np.uint8), rng.randint(0, 10, n).astype(np.int64)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    x, y = _images()
    path = tmp_path_factory.mktemp("cifar") / "tiny_train.npz"
    np.savez(path, x=x, y=y)
    return path


def _jpeg_npz(path, x, y, quality=90):
    from PIL import Image

    blobs = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg_bytes=np.concatenate(blobs), offsets=offsets, y=y)


class _CtrlCAt:
    """A tqdm stand-in whose iteration sends the process a real SIGINT after step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, iterable=None, *a, **k):
        at = self.at

        class Bar:
            def __iter__(self):
                for i, step in enumerate(iterable):
                    if i == at:
                        os.kill(os.getpid(), signal.SIGINT)  # the handler asks the loop to stop after this step
                    yield step

            def set_postfix(self, *a, **k):
                pass

            def close(self):
                pass

            def update(self, *a, **k):
                pass

        return Bar()


# --------------------------------------------------------------------------- data
def test_a_jpeg_npz_is_decoded_as_cifar_images(tmp_path):
    from harness.data import load_split

    x, y = _images(6)
    _jpeg_npz(tmp_path / "j.npz", x, y)
    xt, yt = load_split("cifar10", "train", tmp_path / "j.npz")
    assert xt.shape == (6, 3, 32, 32) and xt.dtype == torch.float32 and yt.tolist() == y.tolist()
    from PIL import Image

    with np.load(tmp_path / "j.npz") as z:
        blob = z["jpeg_bytes"][z["offsets"][4] : z["offsets"][5]].tobytes()
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(xt[4], ref)  # image i is bytes offsets[i]:offsets[i+1], decoded as PIL does
    assert (xt - torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).abs().mean() < 0.05  # lossy, but these images
    from harness.data import _load_raw

    assert _load_raw("cifar10", "train", tmp_path / "j.npz").source["kind"] == "npz-jpeg"


def test_a_broken_jpeg_npz_is_a_one_line_error(tmp_path):
    from harness.data import load_split

    x, y = _images(3)
    _jpeg_npz(tmp_path / "j.npz", x, y)
    with np.load(tmp_path / "j.npz") as z:
        data, offsets = z["jpeg_bytes"].copy(), z["offsets"]
    data[offsets[1] : offsets[1] + 40] = 0  # image 1's header is gone
    np.savez(tmp_path / "bad.npz", jpeg_bytes=data, offsets=offsets, y=y)
    with pytest.raises(HarnessError, match="image 1 is not a readable JPEG") as err:
        load_split("cifar10", "train", tmp_path / "bad.npz")
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "off.npz", jpeg_bytes=data, offsets=offsets[::-1], y=y)
    with pytest.raises(HarnessError, match="offsets"):
        load_split("cifar10", "train", tmp_path / "off.npz")


# --------------------------------------------------------------------------- diffusion
def _ddpm_recipe(**kw):
    from harness.training.diffusion import RECIPES

    return dataclasses.replace(RECIPES["cifar10"], unet_config=TINY_UNET, batch_size=6, ckpt_every=2, curve_every=2, **kw)


def test_cifar_ddpm_trains_on_low_noise_levels_and_loads_as_the_backbone(tmp_path, tiny_npz):
    from defenses.diffpure import DiffPure
    from harness.training.diffusion import train_diffusion

    rec = train_diffusion("cifar10", steps=3, out=tmp_path, data_dir=tiny_npz, recipe=_ddpm_recipe(), progress=False)
    assert rec["data"]["images"] == 24 and rec["data"]["source"]["name"] == "tiny_train.npz"
    assert rec["training"]["max_timestep"] == 300 and "n ~ U{0..299}" in rec["training"]["loss"]
    assert rec["data"]["augmentation"].startswith("random horizontal flip")
    assert set(rec["heldout_eps_mse_by_timestep"]) == {"10", "50", "100"}  # only learned levels are measured
    assert "purified" in rec["sample_grid_kind"] and (tmp_path / "cifar10-ddpm.png").is_file()
    assert [p[0] for p in rec["loss_curve"]] == [2, 3] and not (tmp_path / "cifar10-ddpm.ckpt").exists()
    # --weights-dir finds it under the shipped name, before the shipped file
    d = DiffPure.from_dict({"t_star": 0.02, "dt": 0.01})
    d.setup(SetupContext(classifier=None, weights_dir=tmp_path, **CIFAR_CTX))
    assert d.backbone_source["sha256"] == rec["sha256"]


def test_a_ddpm_stored_in_float16_loads_as_float32_and_measures_what_ships(tmp_path, tiny_npz):
    from defenses.diffpure import DiffPure
    from harness.training.diffusion import train_diffusion

    rec = train_diffusion("cifar10", steps=2, out=tmp_path, data_dir=tiny_npz, recipe=_ddpm_recipe(save_dtype="float16"),
                          grid=False, progress=False)
    state = torch.load(tmp_path / "cifar10-ddpm.pt", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16} and "float16" in rec["training"]["weights_shipped"]
    d = DiffPure.from_dict({"t_star": 0.02, "dt": 0.01})
    d.setup(SetupContext(classifier=None, weights_dir=tmp_path, **CIFAR_CTX))
    net = d.eps_net.net
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert all(torch.equal(net.state_dict()[k], v.float()) for k, v in state.items())


def test_cifar_ddpm_resumes_after_ctrl_c_to_the_uninterrupted_result(tmp_path, tiny_npz, monkeypatch):
    import harness.training.diffusion as T

    recipe = _ddpm_recipe()
    straight = T.train_diffusion("cifar10", steps=5, out=tmp_path / "a", data_dir=tiny_npz, recipe=recipe, grid=False,
                                 progress=False)
    monkeypatch.setattr(T, "tqdm", _CtrlCAt(2))
    with pytest.raises(KeyboardInterrupt):
        T.train_diffusion("cifar10", steps=5, out=tmp_path / "b", data_dir=tiny_npz, recipe=recipe, grid=False, progress=False)
    ck = torch.load(tmp_path / "b" / "cifar10-ddpm.ckpt", weights_only=True)
    assert ck["step"] == 3  # stopped at the end of the step during which Ctrl-C came
    monkeypatch.undo()
    with pytest.raises(HarnessError, match="different run"):
        T.train_diffusion("cifar10", steps=5, seed=1, out=tmp_path / "b", data_dir=tiny_npz, recipe=recipe, resume=True,
                          grid=False, progress=False)
    with pytest.raises(HarnessError, match="5 steps"):
        T.train_diffusion("cifar10", steps=7, out=tmp_path / "b", data_dir=tiny_npz, recipe=recipe, resume=True, grid=False,
                          progress=False)
    resumed = T.train_diffusion("cifar10", steps=5, out=tmp_path / "b", data_dir=tiny_npz, recipe=recipe, resume=True,
                                grid=False, progress=False)
    assert resumed["sha256"] == straight["sha256"] and resumed["loss_curve"] == straight["loss_curve"]


def test_the_gpu_recipes_need_a_gpu_and_build(monkeypatch):
    from diffusers import UNet2DModel

    from harness.cli import main
    from harness.training.diffusion import GPU_RECIPES, recipe_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["train", "diffusion", "--dataset", "cifar10", "--recipe", "gpu"],
                 ["train", "diffusion", "--dataset", "cifar10", "--recipe", "gpu", "--device", "cuda"],
                 ["train", "flowpure", "--variant", "pgd", "--dataset", "cifar10", "--recipe", "gpu"],
                 ["train", "maep", "--dataset", "cifar10", "--recipe", "gpu"]):
        assert main(argv) == 2
    with pytest.raises(HarnessError, match="no gpu diffusion recipe"):
        recipe_for("digits", "gpu")
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet2DModel(**GPU_RECIPES["cifar10"].unet_config).parameters())
    assert 30e6 < n < 40e6 and GPU_RECIPES["cifar10"].max_timestep == 1000


# --------------------------------------------------------------------------- flowpure
def _flow_recipe(**kw):
    from harness.training.flowpure import RECIPES

    base = dict(unet_config=TINY_UNET, batch_size=6, ckpt_every=2, curve_every=2, pgd_steps=2, source_draws={"pgd": 2, "cw": 1},
                cw={"c_max": 2.0, "kappa_max": 1.0, "steps_max": 3, "lr_max": 0.02})
    base.update(kw)
    return dataclasses.replace(RECIPES["cifar10"], **base)


@pytest.fixture(scope="module")
def resnet_tiny(tmp_path_factory):
    """A randomly initialised ResNet-20 saved as a checkpoint (the victim of the tiny trainings)."""
    from harness.classifiers import CifarResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "resnet20-tiny.th"
    state = {f"module.{k}": v for k, v in CifarResNet(20, 10).state_dict().items()}
    torch.save({"state_dict": state}, path)
    return str(path)


def test_flowpure_pgd_caches_its_sources_once_and_resumes_to_the_same_flow(tmp_path, tiny_npz, resnet_tiny, monkeypatch):
    import harness.training.flowpure as T

    args = dict(classifier="resnet20", classifier_weights=resnet_tiny, data_dir=str(tiny_npz), steps=4, eval_n=0,
                recipe=_flow_recipe(), progress=False)
    calls = {"n": 0}
    real = T.make_sources

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(T, "make_sources", counting)
    straight = T.train_flowpure("pgd", "cifar10", out=tmp_path / "a", **args)
    assert calls["n"] == 2  # 2 draws x one batch of 24 images, before training; none per step
    assert straight["source_cache"]["draws_per_image"] == 2 and straight["source_generation_s"] > 0
    assert straight["data"]["source"]["name"] == "tiny_train.npz" and straight["classifier"]["name"] == "resnet20"
    assert not (tmp_path / "a" / "flowpure-pgd-cifar10.sources.pt").exists()  # removed with the checkpoint

    monkeypatch.setattr(T, "tqdm", _CtrlCAt(1))
    with pytest.raises(KeyboardInterrupt):
        T.train_flowpure("pgd", "cifar10", out=tmp_path / "b", **args)
    assert (tmp_path / "b" / "flowpure-pgd-cifar10.sources.pt").is_file()
    calls["n"] = 0
    monkeypatch.setattr(T, "tqdm", real_tqdm())
    resumed = T.train_flowpure("pgd", "cifar10", out=tmp_path / "b", resume=True, **args)
    assert calls["n"] == 0  # the cached sources were reused
    assert resumed["sha256"] == straight["sha256"] and resumed["loss_curve"] == straight["loss_curve"]


def real_tqdm():
    from tqdm import tqdm

    return tqdm


def test_a_source_cache_of_another_run_is_regenerated_not_used(tmp_path, tiny_npz, resnet_tiny):
    from harness.classifiers import load_classifier
    from harness.data import load_split
    from harness.training.flowpure import source_cache

    victim = load_classifier("resnet20", dataset="cifar10", weights=resnet_tiny).module
    x, y = load_split("cifar10", "train", tiny_npz)
    recipe = _flow_recipe()
    path = tmp_path / "c.sources.pt"
    a, spent = source_cache("pgd", victim, x, y, recipe, draws=1, seed=0, path=path, fingerprint={"seed": 0}, progress=False)
    again, spent2 = source_cache("pgd", victim, x, y, recipe, draws=1, seed=0, path=path, fingerprint={"seed": 0}, progress=False)
    assert torch.equal(a, again) and spent2 == spent  # read back, not regenerated
    other, _ = source_cache("pgd", victim, x, y, recipe, draws=1, seed=1, path=path, fingerprint={"seed": 1}, progress=False)
    assert not torch.equal(other, a)
    assert (a - x).abs().amax() <= recipe.eps_max + 1e-6 and (a - x).abs().amax() > 0


def test_flowpure_gauss_and_cw_train_on_cifar_and_load(tmp_path, tiny_npz, resnet_tiny):
    from defenses.flowpure import FlowPureCW, FlowPureGauss
    from harness.training.flowpure import train_flowpure

    for variant, cls in (("cw", FlowPureCW), ("gauss", FlowPureGauss)):
        rec = train_flowpure(variant, "cifar10", classifier="resnet20", classifier_weights=resnet_tiny, data_dir=str(tiny_npz),
                             steps=2, out=tmp_path, eval_n=0, recipe=_flow_recipe(), progress=False)
        assert rec["source_cache"]["draws_per_image"] == (1 if variant == "cw" else None)
        assert rec["training"]["lr_schedule"].startswith("linear warmup")
        d = cls.from_dict({"weights": str(tmp_path / f"flowpure-{variant}-cifar10.pt")})
        d.setup(SetupContext(classifier=None, **CIFAR_CTX))
        out = d.purify(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    # flowpure-gauss injects CIFAR-10's own noise level unless told otherwise; the value used is in the identity
    assert d.config.sigma == 0.1 and "sigma=0.1" in d.setup_notes[0] and d.identity()["config"]["sigma"] == 0.1
    told = FlowPureGauss.from_dict({"weights": str(tmp_path / "flowpure-gauss-cifar10.pt"), "sigma": 0.2})
    told.setup(SetupContext(classifier=None, **CIFAR_CTX))
    assert told.config.sigma == 0.2 and told.setup_notes == []


# --------------------------------------------------------------------------- maep, consistency
def test_maep_trains_on_cifar_with_the_recipe_mask_ratio(tmp_path, tiny_npz, resnet_tiny):
    from defenses.maep import MAEP
    from harness.training.maep import RECIPES, train_maep

    assert RECIPES["cifar10"].mask_ratio == 0.5 and RECIPES["cifar10"].arch == "cifar-cpu"
    rec = train_maep("cifar10", classifier="resnet20", classifier_weights=resnet_tiny, data_dir=str(tiny_npz), epochs=2,
                     pgd_steps=1, eval_n=0, out=tmp_path, progress=False, arch_overrides=dict(emb=16, enc_depth=1, dec_depth=1),
                     log=lambda m: None)
    assert rec["mask_ratio"] == 0.5 and rec["arch"]["patch"] == 4 and rec["data"]["source"]["name"] == "tiny_train.npz"
    assert "--data-dir tiny_train.npz" in rec["command"]
    d = MAEP.from_dict({"weights": str(tmp_path / "maep-cifar10.pt")})
    d.setup(SetupContext(classifier=None, **CIFAR_CTX))
    assert d.purify(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_cifar_consistency_model_is_trained_without_a_teacher(tmp_path, tiny_npz, resnet_tiny):
    from defenses.cmap import CMAP
    from harness.training.consistency import recipes, train_consistency

    assert recipes()["cifar10"].method == "ct" and recipes()["cifar10"].teacher is None
    recipe = dataclasses.replace(recipes()["cifar10"], unet_config=TINY_UNET, batch_size=4, ckpt_every=2, curve_every=1)
    rec = train_consistency("cifar10", steps=2, out=tmp_path, data_dir=str(tiny_npz), classifier="resnet20",
                            classifier_weights=resnet_tiny, recipe=recipe, progress=False)
    assert rec["method"].startswith("consistency training") and rec["one_step_samples"]["n"] == 500
    assert rec["data"]["source"]["name"] == "tiny_train.npz" and json.loads((tmp_path / "cifar10-cm.json").read_text())
    d = CMAP.from_dict({"n_latents": 2, "steps": 1})
    d.setup(SetupContext(classifier=lambda x: torch.zeros(len(x), 10), weights_dir=tmp_path, **CIFAR_CTX))
    assert d.source["sha256"] == rec["sha256"]


def test_the_recorded_evaluation_runs_every_ddpm_purifier_with_the_written_backbone(tmp_path):
    from harness.training.diffusion import RECIPES, evaluate_backbone, train_diffusion

    recipe = dataclasses.replace(RECIPES["digits"], unet_config=small_unet_config(8, 1, (8, 16), 4), batch_size=8)
    rec = train_diffusion("digits", steps=2, out=tmp_path, recipe=recipe, grid=False, progress=False)
    assert rec["eval"] is None
    rec = evaluate_backbone("digits", out=tmp_path, n=4)
    assert set(rec["eval"]) == {"none", "diffpure", "diffpure-ddpm", "coup"}
    for d, ev in rec["eval"].items():
        assert ev["n_examples"] == 4 and ev["threat"] == "preprocessor-blind" and ev["eval_draws"] == (1 if d == "none" else 10)
        assert 0 <= ev["robust_accuracy"] <= ev["clean_accuracy_ci95"][1] + 1 and "--n-examples 4" in ev["command"]
    assert rec["eval"]["diffpure"]["defense_config"]["dt"] == 0.02  # the dataset default, recorded
    assert json.loads((tmp_path / "digits-ddpm.json").read_text())["eval"] == rec["eval"]
    state = torch.load(tmp_path / "digits-ddpm.pt", weights_only=True)
    state[next(iter(state))].add_(1.0)
    torch.save(state, tmp_path / "digits-ddpm.pt")
    with pytest.raises(HarnessError, match="sha256"):
        evaluate_backbone("digits", out=tmp_path, n=4)
