"""Image-quality metrics that need no downloaded weights: PSNR, SSIM, Fréchet and kernel distances.

The two distances are FID and KID with Inception replaced by any feature extractor; the demo and
``benchmarks/quality.py`` use the penultimate features of the shipped digit classifier. Everything
is computed in float64 so that small differences between techniques are not rounding.
"""

from __future__ import annotations

import torch


def relative_l2(images: torch.Tensor, reference: torch.Tensor) -> float:
    """``||images - reference|| / ||reference||`` over the whole batch."""
    a, b = images.double(), reference.double()
    return float((a - b).norm() / b.norm())


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of the peak signal-to-noise ratio in dB (``data_range`` 2 for [-1, 1] images)."""
    mse = (images.double() - reference.double()).square().flatten(1).mean(1)
    per_image = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))
    return float(per_image.mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0, window: int = 7,
         sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004, K1=0.01, K2=0.03, Gaussian window, valid region).

    The window is 7x7 rather than the usual 11x11 because the images are 28x28.
    """
    a, b = images.double(), reference.double()
    channels = a.shape[1]
    kernel = _gaussian_window(window, sigma).expand(channels, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return float(ssim_map.flatten(1).mean(1).mean())


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` of two Gaussian fits (FID's formula)."""
    a, b = features.double(), reference_features.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return float(value.clamp_min(0))


def kernel_distance(features: torch.Tensor, reference_features: torch.Tensor, subsets: int = 20,
                    subset_size: int | None = None, seed: int = 0) -> float:
    """Unbiased MMD² with the cubic polynomial kernel ``(x·y / d + 1)^3`` (KID), averaged over subsets."""
    a, b = features.double(), reference_features.double()
    size = min(subset_size or 1000, len(a), len(b))
    if size < 2:
        raise ValueError(f"kernel_distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    dim = a.shape[1]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        kxx, kyy, kxy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off_diagonal = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (size * (size - 1))
        total += float(off_diagonal - 2 * kxy.mean())
    return total / subsets


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


__all__ = ["relative_l2", "psnr", "ssim", "frechet_distance", "kernel_distance", "accuracy"]
