"""Image quality of every sparsity technique on the shipped MNIST DiT, one row each, on the same seeds.

    python benchmarks/quality.py            # the full table (about 30 min on 2 CPU cores)
    python benchmarks/quality.py --quick    # a reduced run: 2 images per class, 4 steps, a few rows

Every row samples the same labels from the same starting noise with the same Euler steps and
guidance. The sparse layers are the attention and MLP linears of every block (24 GEMMs); the
conditioning GEMMs (M = batch rows) and the 16-wide output projection stay dense in every row.
Activation rows run the reference op eagerly through ``Plan.apply_eager``, which is what the
compiled graph computes (``tests/test_plan_compile.py`` holds the two equal to rounding).

Metrics (no downloaded weights; the feature space is the shipped digit classifier's):
  rel_l2, psnr_db, ssim   the samples against the dense samples of the same seeds
  fd, kd                  Fréchet / kernel (KID) distance to the 1,000 held-out real digits
  accuracy                the classifier's accuracy on the samples against the labels they were drawn for
  layer_err               mean over the 24 layers of ||Y_row - Y_dense|| / ||Y_dense||, each layer fed the
                          dense model's own activations along the calibration trajectories
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import lynx_compile
from lynx_compile import quality
from lynx_compile.calibration import calibrate, input_channel_norms, measure_forward_errors
from lynx_compile.demo import BLOCK_LINEARS
from lynx_compile.kernels import reference
from lynx_compile.models import calibration_run, load_evaluation, load_tiny_dit, sample, training_record
from lynx_compile.kernels.contract import dtype_name, parse_pattern
from lynx_compile.plan import LayerPlan, Plan, planned_forward


@dataclasses.dataclass
class Row:
    name: str
    kind: str                     # "dense", "weights" or "activations"
    pattern: str = "2:4"
    build: Callable | None = None  # (context) -> per-layer forwards {path: fn(x)} (what the row computes)
    dense_first: float = 0.0      # shares of the denoising steps kept dense at the start and the end
    dense_last: float = 0.0       # (the timestep schedule)


# ---- the rows ------------------------------------------------------------------------------------
def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(BLOCK_LINEARS, p)}


def prune_weight(weight: torch.Tensor, score: torch.Tensor, pattern: str) -> torch.Tensor:
    """Keep the top-N-of-M ``score`` entries of every weight row, in groups along K (the input dim)."""
    n, m = parse_pattern(pattern)
    _, indices = reference.nm_select(score, n, m)
    mask = reference.decompress(torch.ones(indices.shape, dtype=weight.dtype), indices, n, m)
    return weight * mask


def weight_rows_forwards(ctx, pattern: str, wanda: bool) -> dict[str, Callable]:
    forwards = {}
    for path, layer in ctx.layers.items():
        score = layer.weight.abs() * (ctx.channel_norms[path].float()[None, :] if wanda else 1.0)
        pruned = prune_weight(layer.weight.detach(), score, pattern)
        forwards[path] = (lambda x, w=pruned, b=layer.bias: F.linear(x, w, b))
    return forwards


def bare_plan(ctx, pattern: str, norm_comp: bool) -> Plan:
    """A plan without compensation tensors: plain N:M on the block linears (optionally norm-compensated)."""
    plan = Plan(pattern=pattern, norm_comp=norm_comp, min_tokens=0, options={"pattern": pattern})
    for path, layer in ctx.layers.items():
        plan.layers[path] = LayerPlan(path, layer.in_features, layer.out_features, dtype_name(layer.weight.dtype),
                                      sparse=True)
    return plan


def plan_forwards(ctx, plan: Plan) -> dict[str, Callable]:
    n, m = plan.nm
    return {p: planned_forward(ctx.layers[p], plan.layers[p], n, m, plan.norm_comp, plan.min_tokens)
            for p in plan.sparse_layers()}


def calibrated(ctx, pattern: str, **options) -> Plan:
    key = (pattern, tuple(sorted(options.items())))
    if key not in ctx.plans:
        started = time.perf_counter()
        ctx.plans[key] = calibrate(ctx.model, ctx.calibration, {"pattern": pattern, "rank": ctx.rank,
                                                                "include": [BLOCK_LINEARS], **options},
                                   progress=ctx.progress)
        ctx.calibration_seconds[str(key)] = time.perf_counter() - started
    return ctx.plans[key]


FULL = dict(low_rank=True, bias_correction=True)  # the complete training-free compensation


def auto_dense_plan(ctx, budget: float | None) -> Plan:
    """Full compensation plus the error-budget search; the default budget halves the all-sparse error."""
    if budget is None:
        budget = 0.5 * calibrated(ctx, "2:4", **FULL).output_error["all_sparse"]
    plan = calibrated(ctx, "2:4", error_budget=round(budget, 4), **FULL)
    ctx.notes["+ automatic dense layers"] = {"error_budget": round(budget, 4), "auto_dense_layers": [
        p for p in plan.dense_layers() if plan.layers[p].auto_dense]}
    return plan


def all_rows(budget: float | None) -> list[Row]:
    return [
        Row("dense", "dense", pattern="-"),
        Row("weights 2:4, magnitude", "weights", build=lambda c: weight_rows_forwards(c, "2:4", wanda=False)),
        Row("weights 2:4, Wanda score", "weights", build=lambda c: weight_rows_forwards(c, "2:4", wanda=True)),
        Row("activations 2:4, naive", "activations", build=lambda c: plan_forwards(c, bare_plan(c, "2:4", False))),
        Row("+ norm compensation", "activations", build=lambda c: plan_forwards(c, bare_plan(c, "2:4", True))),
        Row("+ low-rank (RRR)", "activations",
            build=lambda c: plan_forwards(c, calibrated(c, "2:4", low_rank=True, bias_correction=False))),
        Row("+ bias correction", "activations", build=lambda c: plan_forwards(c, calibrated(c, "2:4", **FULL))),
        Row("+ channel permutation", "activations",
            build=lambda c: plan_forwards(c, calibrated(c, "2:4", permutation=True, **FULL))),
        Row("+ automatic dense layers", "activations", build=lambda c: plan_forwards(c, auto_dense_plan(c, budget))),
        Row("full compensation, dense first 25% of steps", "activations", dense_first=0.25,
            build=lambda c: plan_forwards(c, calibrated(c, "2:4", **FULL))),
        Row("full compensation, dense first 50% of steps", "activations", dense_first=0.5,
            build=lambda c: plan_forwards(c, calibrated(c, "2:4", **FULL))),
        Row("full compensation, dense last 25% of steps", "activations", dense_last=0.25,
            build=lambda c: plan_forwards(c, calibrated(c, "2:4", **FULL))),
        Row("activations 4:8, naive", "activations", pattern="4:8",
            build=lambda c: plan_forwards(c, bare_plan(c, "4:8", False))),
        Row("activations 4:8, full compensation", "activations", pattern="4:8",
            build=lambda c: plan_forwards(c, calibrated(c, "4:8", **FULL))),
        Row("activations 1:2, naive", "activations", pattern="1:2",
            build=lambda c: plan_forwards(c, bare_plan(c, "1:2", False))),
        Row("activations 1:2, full compensation", "activations", pattern="1:2",
            build=lambda c: plan_forwards(c, calibrated(c, "1:2", **FULL))),
        Row("weights 4:8, magnitude", "weights", pattern="4:8",
            build=lambda c: weight_rows_forwards(c, "4:8", wanda=False)),
    ]


QUICK_ROWS = ("dense", "weights 2:4, magnitude", "activations 2:4, naive", "+ norm compensation", "+ bias correction")


# ---- running a row -------------------------------------------------------------------------------
@contextlib.contextmanager
def swapped_forwards(layers: dict[str, nn.Linear], forwards: dict[str, Callable]):
    """Give each named layer the row's forward until the block exits."""
    try:
        for path, fn in forwards.items():
            layers[path].forward = fn
        yield
    finally:
        for path in forwards:
            layers[path].__dict__.pop("forward", None)


class DenseSteps:
    """The row's forwards on every step except the first and last shares: the timestep schedule.

    The same rule as :class:`lynx_compile.DenseSteps`, applied by swapping forwards instead of the
    op's run-time switch, because the rows here run eagerly.
    """

    def __init__(self, ctx, forwards, steps: int, first: float, last: float):
        self.ctx, self.forwards = ctx, forwards
        self.schedule = lynx_compile.DenseSteps(steps, first=round(first * steps), last=round(last * steps))

    def step(self, i: int):
        if self.schedule.is_dense(i):
            return contextlib.nullcontext()
        return swapped_forwards(self.ctx.layers, self.forwards)


@torch.no_grad()
def run_row(ctx, row: Row) -> dict:
    started = time.perf_counter()
    forwards = row.build(ctx) if row.build else {}
    if row.dense_first or row.dense_last:
        schedule = DenseSteps(ctx, forwards, ctx.steps, row.dense_first, row.dense_last)
        images = sample(ctx.model, ctx.labels, steps=ctx.steps, guidance=ctx.guidance, noise=ctx.noise,
                        schedule=schedule)
    else:
        with swapped_forwards(ctx.layers, forwards):
            images = sample(ctx.model, ctx.labels, steps=ctx.steps, guidance=ctx.guidance, noise=ctx.noise)
    features = ctx.classifier.features(images)
    result = {
        "technique": row.name, "sparsified": row.kind, "pattern": row.pattern,
        "dense_layers": len(ctx.layers) - len(forwards) if forwards else len(ctx.layers),
        "rel_l2": quality.relative_l2(images, ctx.dense_images) if ctx.dense_images is not None else 0.0,
        "psnr_db": quality.psnr(images, ctx.dense_images) if ctx.dense_images is not None else None,  # inf
        "ssim": quality.ssim(images, ctx.dense_images) if ctx.dense_images is not None else 1.0,
        "fd": quality.frechet_distance(features, ctx.real_features),
        "kd": quality.kernel_distance(features, ctx.real_features, subsets=ctx.kd_subsets),
        "accuracy": quality.accuracy(ctx.classifier.logits_head(features), ctx.labels),
    }
    if forwards:
        errors = measure_forward_errors(ctx.model, ctx.layer_probe, forwards)
        result["layer_err"] = sum(errors.values()) / len(errors)
        result["layer_errors"] = errors
    else:
        result["layer_err"] = 0.0
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result, images


# ---- the command ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20, help="images per digit class (default 20)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=16, help="low-rank branch rank R (K is 128 or 512 here)")
    parser.add_argument("--budget", type=float, default=None,
                        help="error budget of the automatic-dense row (default: half the all-sparse output error)")
    parser.add_argument("--rows", default="all", help="comma-separated row names (prefixes), or 'all'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 images per class, 4 steps, 5 rows (CI)")
    parser.add_argument("--progress", action="store_true", help="progress bars for calibration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name stem (default quality_<date> or quality_quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.steps = 2, 4

    rows = all_rows(args.budget)
    if args.quick and args.rows == "all":
        rows = [r for r in rows if r.name in QUICK_ROWS]
    elif args.rows != "all":
        wanted = [w.strip() for w in args.rows.split(",")]
        unknown = [w for w in wanted if not any(r.name.startswith(w) for r in rows)]
        if unknown:
            raise SystemExit(f"quality.py: unknown rows {unknown}; valid rows: {[r.name for r in rows]}")
        rows = [r for r in rows if r.name == "dense" or any(r.name.startswith(w) for w in wanted)]

    return run(args, rows)


@torch.no_grad()
def run(args, rows: list[Row]) -> int:
    model = load_tiny_dit()
    classifier, evaluation = load_evaluation()
    ctx = argparse.Namespace(
        model=model, classifier=classifier, layers=block_linears(model), steps=args.steps, guidance=args.guidance,
        labels=torch.arange(10).repeat_interleave(args.per_class), rank=args.rank, plans={},
        calibration_seconds={}, notes={}, progress=args.progress, real_features=evaluation["heldout_features"],
        kd_subsets=10 if args.quick else 50, dense_images=None,
        calibration=calibration_run(args.steps, args.guidance),
        layer_probe=calibration_run(args.steps, args.guidance, per_class=1, seed=20_000),
    )
    ctx.noise = torch.randn(len(ctx.labels), 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    ctx.channel_norms = input_channel_norms(model, ctx.calibration, ctx.layers)
    results = []
    for row in rows:
        result, images = run_row(ctx, row)
        if row.kind == "dense":
            ctx.dense_images = images
        result.update(ctx.notes.get(row.name, {}))
        results.append(result)
        print(f"{row.name}: rel_l2 {result['rel_l2']:.3f}, fd {result['fd']:.1f}, accuracy {result['accuracy']:.3f} "
              f"({result['seconds']} s)", file=sys.stderr, flush=True)

    headers = ["technique", "sparsified", "pattern", "dense_layers", "rel_l2", "psnr_db", "ssim", "fd", "kd",
               "accuracy", "layer_err"]
    table_rows = [[round(r[h], 4) if isinstance(r[h], float) else ("inf" if r[h] is None else r[h]) for h in headers]
                  for r in results]
    table = tabulate(table_rows, headers=headers)
    record = training_record()
    meta = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "lynx_compile": lynx_compile.__version__,
        "model": f"tiny MNIST DiT {record['dit_config']}", "classifier_heldout_accuracy": record["classifier_heldout_accuracy"],
        "images": len(ctx.labels), "steps": args.steps, "guidance": args.guidance, "rank": args.rank,
        "error_budget": args.budget, "seed": args.seed, "sparse_layers": len(ctx.layers),
        "calibration_seconds": ctx.calibration_seconds, "quick": args.quick,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or ("quality_quick" if args.quick else f"quality_{meta['date']}")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(
        f"# Quality on the tiny MNIST DiT ({meta['date']}, {meta['machine']})\n\n"
        f"{meta['images']} images, {meta['steps']} Euler steps, guidance {meta['guidance']}, rank {meta['rank']}; "
        f"command: `python benchmarks/quality.py{' --quick' if args.quick else ''}`\n\n"
        + tabulate(table_rows, headers=headers, tablefmt="github") + "\n")
    print(table)
    print(f"wrote {args.out / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
