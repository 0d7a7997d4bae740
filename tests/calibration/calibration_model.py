"""The calibration tests' model: a tiny DiT-style stack (timestep MLP, AdaLN modulation, LayerNorm + GELU MLP
blocks) trained for a few hundred steps to regress a fixed nonlinear teacher, and its inputs.

The input tokens are low-rank and heavy-tailed with clustered channel magnitudes (neighbouring channels
have similar scale, as DiT outlier channels do), so every linear sees structured activations:
heavy-tailed inputs (proj_in), LayerNorm + modulation outputs (fc1, proj_out) and GELU outputs (fc2).
Used by test_calibration.py and test_plan_compile.py, whose ``setup`` fixtures call ``train_and_sample``.
"""

import math

import torch
from torch import nn

CIN, DIM, HIDDEN, TDIM, DEPTH = 32, 64, 256, 32, 3
RANK = 8
BASE = {"rank": RANK, "min_tokens": 16}  # AdaLN and timestep MLP layers see M = batch = 8 rows


def timestep_embedding(t, dim=16):
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
    args = t[:, None].float() * 1000 * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1).to(t.dtype)


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(TDIM, 2 * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h, temb):
        shift, scale = self.ada(temb).unsqueeze(1).chunk(2, -1)
        return h + self.fc2(self.act(self.fc1(self.norm(h) * (1 + scale) + shift)))


class TinyDiT(nn.Module):
    def __init__(self, hidden=HIDDEN):
        super().__init__()
        self.proj_in = nn.Linear(CIN, DIM)
        self.t_mlp = nn.Sequential(nn.Linear(16, TDIM), nn.SiLU(), nn.Linear(TDIM, TDIM))
        self.blocks = nn.ModuleList(Block(DIM, hidden) for _ in range(DEPTH))
        self.norm_out = nn.LayerNorm(DIM)
        self.proj_out = nn.Linear(DIM, CIN)

    def forward(self, x, t):
        temb = self.t_mlp(timestep_embedding(t))
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(self.norm_out(h))


_BASIS = torch.randn(6, CIN, generator=torch.Generator().manual_seed(123))
CHANNEL_SCALES = torch.exp(torch.linspace(1.5, -1.5, CIN))  # clustered: groups of 4 have similar scale
_TEACHER = (torch.randn(CIN, 48, generator=torch.Generator().manual_seed(7)) / math.sqrt(CIN),
            torch.randn(48, CIN, generator=torch.Generator().manual_seed(8)) / math.sqrt(48))


def sample_tokens(gen, batch=8, tokens=64):
    """Low-rank (6) heavy-tailed (Student-t-like, 3 dof) tokens plus noise, with channel scales."""
    u = torch.rand(batch, tokens, 6, generator=gen).clamp_min(1e-4)
    heavy = torch.randn(batch, tokens, 6, generator=gen) / u.pow(1 / 3)
    x = (heavy @ _BASIS + 0.1 * torch.randn(batch, tokens, CIN, generator=gen)) * CHANNEL_SCALES
    return x, torch.rand(batch, generator=gen)


def teacher(x, t):
    return torch.tanh((x / 3) @ _TEACHER[0] * (1 + t[:, None, None])) @ _TEACHER[1]


def train_and_sample():
    """(trained model, 8 calibration batches, 4 held-out batches)."""
    torch.manual_seed(0)
    model = TinyDiT()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        x, t = sample_tokens(gen)
        loss = (model(x, t) - teacher(x, t)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    cal = [(sample_tokens(gen), {}) for _ in range(8)]
    held = [(sample_tokens(gen), {}) for _ in range(4)]
    return model, cal, held
