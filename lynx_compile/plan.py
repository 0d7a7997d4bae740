"""Calibration plans: per-layer sparsity decisions and compensation tensors, on disk and in eager.

A plan is what ``lynx_compile.calibrate`` produces and what the backend consumes. On disk it is a
folder with ``plan.json`` (pattern, options, one entry per ``nn.Linear`` keyed by module path: its
shape, decision, reason and measured errors) and ``tensors.safetensors`` (the compensation tensors,
keyed ``"<module path>.<name>"``).

Semantics of one sparse layer (W: (N, K) weight, b: bias or 0, x: (..., K)), which every consumer
(``apply_eager`` here, the compiled graph later) must implement exactly::

    xp = x[..., perm]                       if perm is not None else x
    Wp = W[:, perm]                         if perm is not None else W      (offline)
    y  = s(xp) * S(xp) @ Wp.T + (xp @ lr_down) @ lr_up + (b + bias_delta)
       = rtlynx.sparse_matmul(xp, Wp.t(), b + bias_delta, lr_down, lr_up, n=, m=, norm_comp=)

* ``perm`` (int64, K) is a permutation of the reduction dim; ``lr_down`` rows are indexed like
  ``xp`` (so ``lr_down[argsort(perm)]`` applies to the unpermuted x).
* ``lr_down`` (K, R) and ``lr_up`` (R, N) are stored in the layer dtype.
* ``bias_delta`` (N,) is stored in float32 and folded as ``(b.float() + bias_delta).to(dtype)``.
  It belongs to the *sparse* path only: where the op takes its exact dense path (rows <
  ``min_tokens``) the layer must compute the plain ``x @ W.T + b``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tabulate import tabulate
from torch import Tensor, nn

from .kernels import reference
from .kernels.contract import compensation_error, parse_pattern

PLAN_FORMAT = "lynx-compile-plan"
PLAN_VERSION = 1
PLAN_JSON = "plan.json"
PLAN_TENSORS = "tensors.safetensors"
TENSOR_NAMES = ("lr_down", "lr_up", "bias_delta", "perm")

@dataclass
class OpInputs:
    """The tensors one sparse layer hands to ``rtlynx.sparse_matmul`` (after folding the plan in)."""

    perm: Tensor | None      # int64 (K,): gather x[..., perm] before the op, or None
    other: Tensor            # (K, N) = W[:, perm].t(), in the layer dtype
    bias: Tensor | None      # (N,) = b + bias_delta, in the layer dtype, or None
    lr_down: Tensor | None   # (K, R), layer dtype, rows in the permuted order
    lr_up: Tensor | None     # (R, N), layer dtype


@dataclass
class LayerPlan:
    """The decision and compensation tensors for one ``nn.Linear`` (see the module docstring)."""

    path: str
    in_features: int                  # K
    out_features: int                 # N
    dtype: str                        # the layer dtype at calibration time
    sparse: bool                      # False: the layer stays dense (see ``reason``)
    reason: str = ""                  # why it stays dense; "" when sparse
    rank: int = 0                     # R of the low-rank branch, 0 without one
    tokens: int = 0                   # calibration rows seen
    max_rows: int = 0                 # largest rows M of one call
    errors: dict[str, float] = field(default_factory=dict)  # relative output errors, see calibrate()
    auto_dense: dict[str, Any] | None = None  # why the error budget made it dense
    lr_down: Tensor | None = None
    lr_up: Tensor | None = None
    bias_delta: Tensor | None = None
    perm: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The non-None compensation tensors by name."""
        return {name: getattr(self, name) for name in TENSOR_NAMES if getattr(self, name) is not None}

    def check_tensors(self) -> None:
        """Shapes and dtypes agree with K, N and each other; a plan that does not is an error."""
        k, where = self.in_features, f"plan layer {self.path!r}"
        error = compensation_error(k, self.out_features, self.lr_down, self.lr_up, self.perm, self.bias_delta,
                                   bias_name="bias_delta")
        if error:
            raise ValueError(f"{where}: {error}")
        if self.perm is not None and not torch.equal(self.perm.sort().values, torch.arange(k, device=self.perm.device)):
            raise ValueError(f"{where} has a perm that is not a permutation of range(K={k})")

    def op_inputs(self, weight: Tensor, bias: Tensor | None) -> OpInputs:
        """Fold the plan into the layer's own weight and bias: the op's inputs, on the weight's device."""
        dev, dt = weight.device, weight.dtype
        perm = None if self.perm is None else self.perm.to(dev)
        w = weight.detach() if perm is None else weight.detach().index_select(1, perm)
        folded = None if bias is None else bias.detach()
        if self.bias_delta is not None:
            base = torch.zeros(self.out_features, device=dev) if bias is None else bias.detach().float()
            folded = (base + self.bias_delta.to(dev)).to(dt)
        lr_down = None if self.lr_down is None else self.lr_down.to(dev, dt)
        lr_up = None if self.lr_up is None else self.lr_up.to(dev, dt)
        return OpInputs(perm, w.t(), folded, lr_down, lr_up)

    def to_json(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "dtype": self.dtype,
                "decision": "sparse" if self.sparse else "dense", "reason": self.reason, "rank": self.rank,
                "tokens": self.tokens, "max_rows": self.max_rows, "errors": self.errors,
                "auto_dense": self.auto_dense, "tensors": sorted(self.tensors())}

    @classmethod
    def from_json(cls, path: str, data: dict[str, Any]) -> "LayerPlan":
        if data.get("decision") not in ("sparse", "dense"):
            raise ValueError(f"plan layer {path!r} has decision {data.get('decision')!r}; valid: 'sparse', 'dense'")
        return cls(path=path, in_features=int(data["in_features"]), out_features=int(data["out_features"]),
                   dtype=data["dtype"], sparse=data["decision"] == "sparse", reason=data.get("reason", ""),
                   rank=int(data.get("rank", 0)), tokens=int(data.get("tokens", 0)),
                   max_rows=int(data.get("max_rows", 0)), errors=dict(data.get("errors", {})),
                   auto_dense=data.get("auto_dense"))

    def copy(self) -> "LayerPlan":
        out = LayerPlan(**{k: v for k, v in self.__dict__.items() if k not in TENSOR_NAMES})
        out.errors = dict(self.errors)
        out.auto_dense = None if self.auto_dense is None else dict(self.auto_dense)
        for name, t in self.tensors().items():
            setattr(out, name, t.clone())
        return out


def planned_forward(layer: nn.Linear, plan: LayerPlan, n: int, m: int, norm_comp: bool, min_tokens: int):
    """The eager reference-op forward of one planned layer (the ground truth for the compiled graph).

    Inputs are flattened to 2-D rows like the compiled graph's ``addmm``, so ``min_tokens`` compares
    against the same M. Below it, the layer is the exact dense ``F.linear`` (no plan tensors).
    """
    op = plan.op_inputs(layer.weight, layer.bias)
    weight, bias = layer.weight, layer.bias

    def forward(x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] < min_tokens:
            return nn.functional.linear(x, weight, bias)
        xp = x2 if op.perm is None else x2.index_select(1, op.perm)
        y = reference.sparse_matmul(xp, op.other, op.bias, op.lr_down, op.lr_up, n=n, m=m, norm_comp=norm_comp)
        return y.reshape(*lead, y.shape[-1])

    return forward


@dataclass
class Plan:
    """Per-layer sparsity decisions and compensation tensors for one model (see module docstring)."""

    pattern: str = "2:4"
    norm_comp: bool = True
    min_tokens: int = 0
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)       # the CalibrationConfig used
    output_error: dict[str, Any] | None = None                  # model-output errors and budget search

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def sparse_layers(self) -> list[str]:
        return [p for p, lp in self.layers.items() if lp.sparse]

    def dense_layers(self) -> list[str]:
        return [p for p, lp in self.layers.items() if not lp.sparse]

    def copy(self) -> "Plan":
        return Plan(self.pattern, self.norm_comp, self.min_tokens,
                    {p: lp.copy() for p, lp in self.layers.items()}, json.loads(json.dumps(self.options)),
                    None if self.output_error is None else json.loads(json.dumps(self.output_error)))

    # ---- disk -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "pattern": self.pattern,
                "norm_comp": self.norm_comp, "min_tokens": self.min_tokens, "options": self.options,
                "output_error": self.output_error,
                "layers": {p: lp.to_json() for p, lp in self.layers.items()}}

    def digest(self) -> str:
        """A hash of every decision and tensor: part of Inductor's cache key when a plan is compiled in."""
        h = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, default=str).encode())
        for p, lp in sorted(self.layers.items()):
            for name, t in sorted(lp.tensors().items()):
                h.update(f"{p}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/plan.json`` and ``path/tensors.safetensors`` (the folder is created)."""
        for lp in self.layers.values():
            lp.check_tensors()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{p}.{name}": t.detach().cpu().contiguous()
                   for p, lp in self.layers.items() for name, t in lp.tensors().items()}
        save_file(tensors, str(folder / PLAN_TENSORS), metadata={"format": PLAN_FORMAT, "version": str(PLAN_VERSION)})
        (folder / PLAN_JSON).write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by ``save``; a missing or inconsistent file is a ``ValueError``."""
        folder = Path(path)
        if not (folder / PLAN_JSON).is_file():
            raise ValueError(f"{folder} is not a lynx-compile plan: {PLAN_JSON} is missing")
        data = json.loads((folder / PLAN_JSON).read_text())
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise ValueError(f"{folder / PLAN_JSON}: expected format {PLAN_FORMAT!r} version {PLAN_VERSION}, "
                             f"got {data.get('format')!r} version {data.get('version')!r}")
        plan = cls(pattern=data["pattern"], norm_comp=bool(data["norm_comp"]), min_tokens=int(data["min_tokens"]),
                   options=data.get("options", {}), output_error=data.get("output_error"))
        parse_pattern(plan.pattern)  # an unknown pattern is an error that lists the valid ones
        stored: dict[str, Tensor] = {}
        if (folder / PLAN_TENSORS).is_file():
            with safe_open(str(folder / PLAN_TENSORS), framework="pt") as f:
                stored = {key: f.get_tensor(key) for key in f.keys()}
        for p, entry in data["layers"].items():
            lp = LayerPlan.from_json(p, entry)
            for name in entry.get("tensors", []):
                key = f"{p}.{name}"
                if name not in TENSOR_NAMES or key not in stored:
                    raise ValueError(f"plan layer {p!r}: tensor {key!r} is missing from {PLAN_TENSORS}")
                setattr(lp, name, stored.pop(key))
            lp.check_tensors()
            plan.layers[p] = lp
        if stored:
            raise ValueError(f"{PLAN_TENSORS} holds tensors of no plan layer: {sorted(stored)[:5]}")
        return plan

    # ---- model ----------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Every plan layer is an ``nn.Linear`` of ``model`` with the same K and N; else ``ValueError``."""
        modules = dict(model.named_modules())
        for p, lp in self.layers.items():
            module = modules.get(p)
            if module is None:
                close = difflib.get_close_matches(p, list(modules), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"plan layer {p!r} is not a module of the model{hint}")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"plan layer {p!r} is a {type(module).__name__} in the model, not an nn.Linear")
            if module.in_features != lp.in_features:
                raise ValueError(f"plan layer {p!r} has K={lp.in_features} but the model's layer has "
                                 f"K={module.in_features}")
            if module.out_features != lp.out_features:
                raise ValueError(f"plan layer {p!r} has N={lp.out_features} but the model's layer has "
                                 f"N={module.out_features}")
            lp.check_tensors()

    @contextlib.contextmanager
    def apply_eager(self, model: nn.Module, only: set[str] | None = None) -> Iterator[nn.Module]:
        """Run every sparse plan layer of ``model`` through the reference op, until the block exits.

        This is the eager ground truth of what the compiled graph computes with this plan. ``only``
        restricts the swap to those layer paths (the budget search uses it).
        """
        self.validate(model)
        n, m = self.nm
        modules = dict(model.named_modules())
        swapped = []
        try:
            for p, lp in self.layers.items():
                if lp.sparse and (only is None or p in only):
                    module = modules[p]
                    swapped.append((module, module.__dict__.get("forward")))
                    module.forward = planned_forward(module, lp, n, m, self.norm_comp, self.min_tokens)
            yield model
        finally:
            for module, previous in reversed(swapped):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    # ---- reading --------------------------------------------------------------------------------
    def table(self) -> str:
        """One row per layer: decision, rank, errors and reason (what a report shows)."""
        keys = ["plain", "norm", "bias", "lowrank", "perm", "final"]
        rows = []
        for p, lp in self.layers.items():
            errs = [_fmt(lp.errors.get(k)) for k in keys]
            rows.append([p, f"{lp.in_features}x{lp.out_features}", "sparse" if lp.sparse else "dense", lp.rank,
                         "yes" if lp.perm is not None else "", *errs, lp.reason])
        head = ["layer", "KxN", "decision", "R", "perm", *keys, "reason"]
        text = tabulate(rows, headers=head, tablefmt="simple")
        if self.output_error:
            text += "\nmodel output error: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.output_error.items()
                                                          if isinstance(v, (int, float)) and v is not None)
        return text

    def __str__(self) -> str:
        return self.table()


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def plan_settings(plan: Plan) -> dict[str, Any]:
    """The plan's pattern, filters and ``min_tokens``, as the backend's options spell them."""
    return {"pattern": plan.pattern, "norm_comp": plan.norm_comp,
            "include": tuple(plan.options.get("include") or ()), "exclude": tuple(plan.options.get("exclude") or ()),
            "min_tokens": plan.min_tokens}


def load_plan(config):
    """(the plan named by the backend option ``plan``, the options completed from it); (None, config) without one.

    The backend uses the plan's pattern, filters and ``min_tokens`` unless the options set them, so a
    plan compiles with the settings it was calibrated with. An option set to another value than the
    plan's is an error that names both.
    """
    if config.plan is None:
        return None, config
    plan = Plan.load(config.plan)
    settings = plan_settings(plan)
    for key, value in settings.items():
        if key in config.given and getattr(config, key) != value:
            raise ValueError(f"option {key!r} is {getattr(config, key)!r} but plan {config.plan} was calibrated with "
                             f"{key}={value!r}; leave the option out to use the plan's value, or calibrate again")
    return plan, dataclasses.replace(config, **{k: v for k, v in settings.items() if k not in config.given})
