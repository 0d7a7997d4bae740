"""A small class-conditional DiT (adaLN-Zero, GELU MLP, patchify) trained on MNIST digits.

It is the model behind ``python -m lynx_compile demo`` and ``benchmarks/quality.py``: real trained
activations at a size that runs on a laptop CPU. Module names follow the DiT reference code
(``blocks.3.mlp.fc1``) so that include/exclude regexes written for DiT work here too.
Training is rectified flow (``x_t = (1 - t) x0 + t noise``, the network predicts ``noise - x0``), the
objective of SD3 and Flux; sampling is Euler steps from t=1 to t=0 with classifier-free guidance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class TinyDiTConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout: float = 0.1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 128):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t in [0, 1], scaled to DiT's 0..1000 range so the sinusoid frequencies are the usual ones.
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(embedding)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, hidden))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    """``forward(x, t, y)``: images (B, C, H, W) in [-1, 1], t (B,) in [0, 1], labels (B,) with 10 = unconditional."""

    def __init__(self, config: TinyDiTConfig = TinyDiTConfig()):
        super().__init__()
        self.config = config
        c = config
        self.x_embedder = nn.Conv2d(c.channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.hidden_size), requires_grad=False)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = nn.Embedding(c.num_classes + 1, c.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.channels)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def reset_parameters(self) -> None:
        """DiT's initialisation: xavier linears, sin-cos positions, zeroed adaLN and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        side = self.config.image_size // self.config.patch_size
        self.pos_embed.data.copy_(_sincos_2d(self.config.hidden_size, side).unsqueeze(0))
        weight = self.x_embedder.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        side = c.image_size // c.patch_size
        x = x.reshape(x.shape[0], side, side, c.patch_size, c.patch_size, c.channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c.channels, c.image_size, c.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


def _sincos_2d(dim: int, side: int) -> torch.Tensor:
    coords = torch.arange(side, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    parts = []
    for grid in (grid_w, grid_h):
        angles = grid.reshape(-1, 1) * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def sample(model: nn.Module, labels: torch.Tensor, *, steps: int = 20, guidance: float = 2.0,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           schedule=None, progress=None) -> torch.Tensor:
    """Euler sampling of the rectified-flow ODE with classifier-free guidance; returns images in [-1, 1].

    ``model`` may be the eager model or a compiled one; the conditional and unconditional halves run as
    one doubled batch, as production CFG pipelines do, so a compiled model sees one shape per call.
    ``noise`` fixes the starting point (the demo gives dense and sparse runs the same one).
    ``schedule`` is a :class:`lynx_compile.DenseSteps` (anything with ``.step(i)`` returning a context
    manager); ``progress(i)`` is called after every step.
    """
    config = _config_of(model)
    shape = (labels.shape[0], config.channels, config.image_size, config.image_size)
    device = labels.device
    x = noise.clone() if noise is not None else torch.randn(shape, generator=generator, device=device)
    null = torch.full_like(labels, config.num_classes)
    both_labels = torch.cat([labels, null])
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    dtype = next(_parameters_of(model)).dtype
    for i in range(steps):
        t = times[i].repeat(2 * labels.shape[0])  # contiguous, as pipelines pass it (a stride-0 view recompiles)
        with schedule.step(i) if schedule is not None else contextlib.nullcontext():
            velocity = model(torch.cat([x, x]).to(dtype), t, both_labels).float()
        cond, uncond = velocity.chunk(2)
        x = x + (times[i + 1] - times[i]) * (uncond + guidance * (cond - uncond))
        if progress is not None:
            progress(i)
    return x.clamp(-1, 1)


def _original(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _config_of(model: nn.Module) -> TinyDiTConfig:
    return _original(model).config


def _parameters_of(model: nn.Module):
    return _original(model).parameters()


def calibration_run(steps: int = 20, guidance: float = 2.0, per_class: int = 2, seed: int = 10_000):
    """``calibration_inputs`` for :func:`lynx_compile.calibrate`: whole sampling loops of ``per_class``
    images of every digit, on seeds that the demo and the quality benchmark never evaluate on."""
    from ..calibration import calibration_inputs_from_loop

    def loop(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        device = next(_parameters_of(model)).device
        return sample(model, labels.to(device), steps=steps, guidance=guidance)

    return calibration_inputs_from_loop(loop, [torch.arange(10).repeat(per_class)], seed=seed)
