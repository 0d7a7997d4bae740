"""The quality metrics against direct computations, and the PNG writer against a real decoder."""

import math

import numpy as np
import pytest
import torch

from lynx_compile import quality
from lynx_compile.images import grid, side_by_side, to_uint8, write_png
from shared import not_installed


def _images(seed, count=5):
    return torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_relative_l2_and_psnr_against_their_definitions():
    a, b = _images(0), _images(1)
    assert quality.relative_l2(a, b) == pytest.approx(float((a.double() - b.double()).norm() / b.double().norm()), rel=1e-12)
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    want = float((10 * torch.log10(4.0 / mse)).mean())
    assert quality.psnr(a, b) == pytest.approx(want, rel=1e-12)
    # 0.1 everywhere on a data range of 2: 20 log10(2 / 0.1) dB exactly
    assert quality.psnr(b + 0.1, b) == pytest.approx(20 * math.log10(20), rel=1e-6)


def _ssim_loop(a, b, window=7, sigma=1.5, data_range=2.0):
    """SSIM written out window by window (Wang et al. 2004), for one single-channel image."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            pa, pb = a[i:i + window, j:j + window].double(), b[i:i + window, j:j + window].double()
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(values).mean())


def test_ssim_against_a_window_by_window_computation():
    a, b = _images(2, 2), _images(3, 2)
    b = 0.7 * a + 0.3 * b  # correlated, so SSIM is well away from 0 and 1
    want = sum(_ssim_loop(a[i, 0], b[i, 0]) for i in range(2)) / 2
    assert quality.ssim(a, b) == pytest.approx(want, rel=1e-10)
    assert quality.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_frechet_distance_of_gaussians_has_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    base = (base - base.mean(0)) / base.std(0)  # unit sample variances, zero sample means
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 for standard deviations s.
    scales, shift = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    decorrelated = base @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(base.T))).T
    other = decorrelated * scales + shift
    want = float(shift.square().sum() + (scales - 1).square().sum())
    assert quality.frechet_distance(other, decorrelated) == pytest.approx(want, rel=1e-9)
    assert quality.frechet_distance(decorrelated, decorrelated) == pytest.approx(0.0, abs=1e-9)


def test_kernel_distance_against_the_unbiased_mmd_formula():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=gen), torch.randn(30, 4, generator=gen) + 0.5
    xd, yd = x.double(), y.double()
    k = lambda p, q: (p @ q.T / 4 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(xd, xd), k(yd, yd), k(xd, yd)
    want = float((kxx.sum() - kxx.trace()) / (30 * 29) + (kyy.sum() - kyy.trace()) / (30 * 29) - 2 * kxy.mean())
    # a subset of the full size is a permutation of all samples: every subset gives the same value
    assert quality.kernel_distance(x, y, subsets=3, subset_size=30) == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2 samples per set, got 1 and 30"):
        quality.kernel_distance(x[:1], y)


def test_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert quality.accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


def test_png_round_trips_through_a_decoder(tmp_path):
    image_module = pytest.importorskip("PIL.Image", reason=not_installed("Pillow", via=" via matplotlib"))
    images = to_uint8(_images(4, 3))
    figure = side_by_side([grid(images, columns=2), grid(images[:1], columns=1)])
    path = write_png(tmp_path / "grid.png", figure)
    decoded = torch.from_numpy(np.array(image_module.open(path)))
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, figure)
    # the grid puts image 2 in row 2, column 1 (2-pixel padding), and the second panel after an 8-pixel gap
    assert torch.equal(figure[2 + 30:2 + 30 + 28, 2:30], images[2, 0])
    assert torch.equal(figure[2:30, grid(images, 2).shape[1] + 8 + 2:][:, :28], images[0, 0])


def test_png_and_grid_reject_what_they_cannot_write(tmp_path):
    with pytest.raises(ValueError, match=r"write_png needs a 2-D uint8 tensor, got torch.float32 of shape \(2, 2\)"):
        write_png(tmp_path / "x.png", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="grid\\(\\) writes grayscale images, got 3 channels"):
        grid(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), columns=1)
