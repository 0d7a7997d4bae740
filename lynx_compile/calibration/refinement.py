"""Gradient refinement: after the closed-form fit, train each layer's low-rank branch further against
its dense output (the backbone frozen), and keep the result only where it measurably helps."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels import reference
from ..kernels.contract import DTYPES
from ..plan import LayerPlan, Plan
from .hooks import forward_hooks, layer_input
from .measurement import _measure
from .runner import _Runner


class _Trainer:
    """Adam on one layer's (lr_down, lr_up) against the dense output; the backbone stays frozen."""

    def __init__(self, layer: nn.Linear, lp: LayerPlan, rank: int, lr: float, n: int, m: int, norm_comp: bool):
        k, n_out = lp.in_features, lp.out_features
        if lp.lr_down is None:  # LoRA-style start: a random down-projection, a zero up-projection
            gen = torch.Generator().manual_seed(0)
            down = torch.randn(k, rank, generator=gen) / math.sqrt(k)
            up = torch.zeros(rank, n_out)
        else:
            down, up = lp.lr_down.float(), lp.lr_up.float()
        dev = layer.weight.device
        self.down = down.to(dev).clone().requires_grad_(True)
        self.up = up.to(dev).clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.down, self.up], lr=lr)
        self.layer, self.lp, self.n, self.m, self.norm_comp = layer, lp, n, m, norm_comp
        self.steps = 0
        probe = lp.copy()
        probe.lr_down = probe.lr_up = None
        self.op = probe.op_inputs(layer.weight, layer.bias)  # perm, permuted W^T, folded bias

    def train(self, x: Tensor, out: Tensor, steps: int) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        xp = x2 if self.op.perm is None else x2.index_select(1, self.op.perm)
        base = reference.sparse_matmul(xp, self.op.other, self.op.bias, n=self.n, m=self.m, norm_comp=self.norm_comp)
        target = (out.reshape(-1, out.shape[-1]).float() - base.float()).detach()
        xf = xp.float().detach()
        with torch.enable_grad():
            for _ in range(steps):
                loss = (xf @ self.down @ self.up - target).square().mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.steps += 1


def refine(plan: Plan, model: nn.Module, calibration_inputs, *, steps: int = 100, lr: float = 1e-3,
           steps_per_batch: int = 4, progress: bool = True) -> Plan:
    """Train each sparse layer's low-rank branch further with MSE against its dense output.

    Streams: a forward hook takes ``steps_per_batch`` Adam steps on each call's rows and drops them,
    and the calibration inputs are replayed until every layer has taken ``steps`` steps. Layers
    without a low-rank branch start from a LoRA-style init of rank ``min(options rank, K, N)``. A
    final pass measures every layer before and after; a layer keeps its refined tensors only where
    they lower its calibration error (``errors["refined"]``). Returns a new plan.
    """
    if steps < 1 or steps_per_batch < 1 or not lr > 0:
        raise ValueError(f"refine needs steps >= 1, steps_per_batch >= 1 and lr > 0, got {steps}, "
                         f"{steps_per_batch}, {lr}")
    plan.validate(model)
    runner = _Runner(calibration_inputs)
    n, m = plan.nm
    modules = dict(model.named_modules())
    trainers, hooks = {}, []
    for p in plan.sparse_layers():
        lp = plan.layers[p]
        rank = lp.rank or min(int(plan.options.get("rank", 64)), lp.in_features, lp.out_features)
        trainers[p] = t = _Trainer(modules[p], lp, rank, lr, n, m, plan.norm_comp)

        def hook(mod, args, kwargs, out, t=t):
            x = layer_input(args, kwargs)
            if t.steps < steps and x.reshape(-1, x.shape[-1]).shape[0] >= plan.min_tokens:
                t.train(x, out, min(steps_per_batch, steps - t.steps))

        hooks.append((modules[p], hook))
    with forward_hooks(hooks, with_kwargs=True):
        for i in range(steps):  # each replay trains every called layer at least once
            if all(t.steps >= steps for t in trainers.values()):
                break
            before = sum(t.steps for t in trainers.values())
            runner.run(model, f"refine pass {i + 1}", progress)
            if sum(t.steps for t in trainers.values()) == before:
                break  # nothing trainable was called (all below min_tokens)

    refined = plan.copy()
    for p, t in trainers.items():
        lp = refined.layers[p]
        lp.lr_down = t.down.detach().to(torch.device("cpu"), _dtype_of(lp))
        lp.lr_up = t.up.detach().to(torch.device("cpu"), _dtype_of(lp))
        lp.rank = lp.lr_down.shape[1]
    measured = _measure({"old": plan, "new": refined}, model, runner, progress)
    out = plan.copy()
    for p in trainers:
        old, new = measured.get("old", {}).get(p), measured.get("new", {}).get(p)
        if new is not None and (old is None or new < old):
            out.layers[p] = refined.layers[p]
        if new is not None and old is not None:
            out.layers[p].errors.update(refined=new, before_refine=old)
    return out


def _dtype_of(lp: LayerPlan) -> torch.dtype:
    return DTYPES.get(lp.dtype, torch.float32)
