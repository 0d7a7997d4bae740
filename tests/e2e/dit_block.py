"""The model that test_backend.py and test_explain.py compile (4 GEMMs: fc1 and fc2 as addmm, two bmm)."""

import torch
import torch.nn as nn


class Block(nn.Module):
    """A DiT-like MLP block plus an attention-style product, with enough tokens to pass min_tokens."""

    def __init__(self, dim=32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        scores = torch.softmax(h @ x.transpose(-1, -2), dim=-1)
        return x + scores @ h


def block_and_input(tokens=16):
    """A seeded Block (eval) and an input of (2, tokens, 32)."""
    torch.manual_seed(0)
    return Block().eval(), torch.randn(2, tokens, 32)
