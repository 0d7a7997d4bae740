"""Channel permutation: reorder a layer's input channels so every group of M mixes large and small
ones, and the top-n of each group drops small channels instead of competing large ones. The
channel energies it sorts by come from one cheap pass (also Wanda's input norms)."""

from __future__ import annotations

import torch
from torch import Tensor

from .hooks import _flat_input, forward_hooks


def balanced_permutation(channel_energy: Tensor, m: int) -> Tensor:
    """A permutation of K that gives every group of ``m`` a mix of large and small channels.

    Channels sorted by calibrated energy (sum of x^2) are dealt round-robin into the K/m groups:
    group g gets ranks g, g+G, g+2G, ... (one channel from each magnitude band), so the top-n of a
    group drops its small channels instead of competing large ones. Inside a group the channels keep
    ascending index order. Returns int64 ``perm`` with ``x[..., perm]`` the permuted input.
    """
    k = channel_energy.numel()
    groups = k // m
    order = torch.argsort(channel_energy.double().cpu(), descending=True, stable=True)
    members = order.reshape(m, groups).T            # row g: ranks g, g+G, ...
    return members.sort(dim=1).values.reshape(-1).to(torch.int64).contiguous()


def _channel_energy(model, runner, layers, progress, label):
    """A first, cheap pass for the permutation: per-channel sum of x^2 of each layer, and outputs."""
    energy = {p: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
              for p, lin in layers.items()}

    def hook(mod, args, kwargs, out, p):
        energy[p] += _flat_input(args, kwargs).double().square().sum(0)

    with forward_hooks([(lin, lambda *a, p=p: hook(*a, p)) for p, lin in layers.items()], with_kwargs=True):
        outputs = runner.run(model, f"{label} channel magnitudes", progress)
    return energy, outputs
