"""PSNR and SSIM against known values, and their presence in every job."""

from __future__ import annotations

import math

import torch

from harness import evaluation as E
from harness.evaluation.quality import PSNR_MAX_DB, psnr, ssim
from harness.store import Store
from tests.conftest import TOY_PLUGIN


def test_psnr_known_values():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full((2, 1, 8, 8), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))
    c = torch.zeros(1, 3, 4, 4)
    c[..., 0, 0] = 1.0  # one wrong pixel per channel in 16: MSE = 1/16
    assert math.isclose(psnr(torch.zeros_like(c), c).item(), 10 * math.log10(16), rel_tol=1e-5)
    assert torch.allclose(psnr(a, a), torch.full((2,), PSNR_MAX_DB))


def test_ssim_known_values():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # constant images: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.2, 0.6
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 1, 8, 8), a, dtype=torch.float64), torch.full((1, 1, 8, 8), b, dtype=torch.float64))
    assert math.isclose(got.item(), expected, rel_tol=2e-5)  # pytorch-msssim builds its window in float32
    # a negated-contrast image is strongly dissimilar
    assert ssim(x, 1 - x).mean() < 0


def _reference_ssim(a, b, win=11, sigma=1.5):
    """The Wang et al. formula written out, to check the library against."""
    import torch.nn.functional as F

    c = a.shape[1]
    size = min(win, a.shape[-1], a.shape[-2])
    size -= size % 2 == 0
    ax = torch.arange(size, dtype=a.dtype) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    s_aa, s_bb, s_ab = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))).flatten(1).mean(1)


def test_ssim_is_the_formula_and_differentiable():
    g = torch.Generator().manual_seed(0)
    for shape in [(4, 1, 8, 8), (3, 3, 32, 32), (2, 1, 28, 28)]:
        a = torch.rand(shape, generator=g)
        b = (a + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
        torch.testing.assert_close(ssim(a, b), _reference_ssim(a, b), atol=1e-6, rtol=1e-5)
    a = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ssim(t, b), (a,))


def test_every_job_stores_image_quality(tmp_path):
    st = Store(str(tmp_path / "r.db"))
    none = E.run_job(E.resolve(E.RunConfig(n_examples=16)), st, progress=False)
    assert math.isclose(none.metrics["psnr_clean"]["value"], PSNR_MAX_DB, rel_tol=1e-6)
    assert math.isclose(none.metrics["ssim_clean"]["value"], 1.0, rel_tol=1e-6)
    assert none.metrics["psnr_adv"]["value"] < 40
    smooth = E.run_job(E.resolve(E.RunConfig(defense="toy-smooth", n_examples=16, plugins=(TOY_PLUGIN,))), st, progress=False)
    assert smooth.metrics["psnr_clean"]["value"] < PSNR_MAX_DB and 0 < smooth.metrics["ssim_clean"]["value"] < 1
    row = st.results_table()[0]
    assert {"psnr_clean", "ssim_clean", "psnr_adv", "ssim_adv"} <= set(row)
