"""Time each tile configuration of the fused CUDA kernel per GEMM shape, and keep the fastest.

    python benchmarks/tune_fused.py                  # CUDA: the DiT shape set (bench_linear's)
    python benchmarks/tune_fused.py --install        # ... and write the table that the kernel reads
    python benchmarks/tune_fused.py --dry-run        # anywhere: the wave model's choice; nothing is timed

For each (M, K, N), each configuration that fits the device's shared memory runs once and is
checked against the reference op. A configuration with a wrong result is skipped, and the reason
is recorded. The others are timed with ``triton.testing.do_bench`` medians, with inputs rotated past
the L2 cache (bench_linear's helpers), without the low-rank term. The script prints microseconds
per configuration, the fastest, the wave model's pick, and whether the two agree. It writes
``<out>/tune_fused_<device>_<date>.json`` after each shape, so a run that is cut short keeps what
it measured. ``--install`` also merges the fastest configurations into the tuned table in
``$LYNX_COMPILE_CACHE/tuned/`` (default ``~/.cache/lynx_compile/tuned/``). That is where
``kernels/fused_tiles.py`` looks first. The format is in kernels/tuned/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

import bench_linear
from lynx_compile.kernels import fused_cuda, fused_tiles, reference, registry

H100 = "NVIDIA H100 80GB HBM3,132,232448,233472,9.0"


def parse_device_info(text: str) -> fused_tiles.DeviceInfo:
    parts = text.rsplit(",", 4)
    capability = parts[-1].strip().split(".")
    if (len(parts) != 5 or not parts[0] or not all(p.strip().isdigit() for p in parts[1:4])
            or len(capability) != 2 or not all(c.isdigit() for c in capability)):
        raise SystemExit(f"tune_fused: --device-info {text!r} is not NAME,SMS,SMEM_BLOCK,SMEM_SM,CAPABILITY, "
                         f"e.g. {H100!r}")
    return fused_tiles.DeviceInfo(parts[0], *(int(p) for p in parts[1:4]), tuple(int(c) for c in capability))


def dry_run_rows(info: fused_tiles.DeviceInfo, shapes) -> list[list]:
    """[MxKxN, config, tiles, waves] per shape, as the wave model predicts them (tuned tables not read)."""
    rows = []
    for m, k, n in shapes:
        config, _ = fused_tiles.heuristic(info, m, n, fused_cuda.device_configs(info))
        prediction = fused_tiles.predict(info, config, m, n)
        rows.append([f"{m}x{k}x{n}", config.name, prediction.tiles, prediction.waves])
    return rows


def tune_shape(shape, dtype: torch.dtype, info: fused_tiles.DeviceInfo) -> dict:
    m, k, n = shape
    pools = bench_linear.make_pools(m, k, n, dtype, "cuda", False, bench_linear.pool_count(m, k, n, dtype, "cuda"))
    x, w_t, bias, _, _ = pools[0]
    expected = reference.sparse_matmul(x, w_t, bias, n=2, m=4).float()
    tolerance = 2 * torch.finfo(dtype).eps * expected.abs().max().item()  # as tests/test_fused_cuda.py
    configs = {}
    for config in fused_cuda.device_configs(info):
        def run(x, w_t, bias, lr_down, lr_up, config=config):
            out = torch.empty(x.shape[0], w_t.shape[1], dtype=x.dtype, device=x.device)
            return fused_cuda.launch(x, w_t.t(), bias, None, None, out, True, config=config)

        try:
            error = (run(*pools[0]).float() - expected).abs().max().item()
            if not error <= tolerance:  # NaN fails too
                configs[config.name] = {"us": None, "error": f"wrong result: max abs error {error:.3g} > "
                                                            f"tolerance {tolerance:.3g}"}
                continue
            configs[config.name] = {"us": 1e3 * bench_linear.time_ms(run, pools, "cuda"), "max_abs_error": error}
        except Exception as exc:  # a configuration that cannot build or run is reported, not fatal
            configs[config.name] = {"us": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    timed = {name: row["us"] for name, row in configs.items() if row["us"] is not None}
    best = min(timed, key=timed.get) if timed else None
    heuristic, reason = fused_tiles.heuristic(info, m, n, fused_cuda.device_configs(info))
    return {"shape": [m, k, n], "configs": configs, "best": best, "heuristic": heuristic.name,
            "heuristic_reason": reason, "agree": best == heuristic.name}


def install(report: dict) -> Path:
    """Merge the fastest configurations into the user's tuned table for this device; returns its path."""
    path = fused_tiles.table_paths(report["device"])[0]
    fused_tiles.clear_cache()
    entries = {(e.dtype, e.m, e.n, e.k): dataclasses.asdict(e) for e in fused_tiles.load_table(path)}
    for result in report["results"]:
        if result["best"]:
            m, k, n = result["shape"]
            entries[(report["dtype"], m, n, k)] = {"dtype": report["dtype"], "m": m, "n": n, "k": k,
                                                   "config": result["best"],
                                                   "us": round(result["configs"][result["best"]]["us"], 2)}
    table = {"device": report["device"], "date": report["date"], "torch": report["torch"],
             "entries": [entries[key] for key in sorted(entries)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    fused_tiles.clear_cache()
    return path


def table_rows(results: list[dict], names: list[str]) -> list[list]:
    """One row per shape; a configuration that failed shows the kind of failure (the JSON has the rest)."""
    rows = []
    for r in results:
        cells = [f"{r['configs'][name]['us']:.1f}" if r["configs"].get(name, {}).get("us") is not None
                 else r["configs"].get(name, {}).get("error", "").split(":")[0] for name in names]
        rows.append(["x".join(map(str, r["shape"])), *cells, r["best"] or "-", r["heuristic"],
                     "yes" if r["agree"] else "no"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help="comma-separated MxKxN (default: the DiT shape set)")
    parser.add_argument("--dtype", default="bfloat16", choices=fused_tiles.DTYPES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON report")
    parser.add_argument("--install", action="store_true", help="also write the tuned table to the user's cache")
    parser.add_argument("--dry-run", action="store_true", help="print the wave model's choices; time nothing")
    parser.add_argument("--device-info", help=f"with --dry-run: NAME,SMS,SMEM_BLOCK,SMEM_SM,CAPABILITY (default {H100!r})")
    args = parser.parse_args(argv)
    shapes = bench_linear.parse_shapes(args.shapes, prog="tune_fused")
    if args.dry_run:
        info = parse_device_info(args.device_info or H100)
        print(f"{info.name}: {info.sm_count} SMs, {info.max_smem_per_block} B shared memory per block, "
              f"{info.max_smem_per_sm} B per SM; the wave model's choice (unmeasured)")
        print(tabulate(dry_run_rows(info, shapes), headers=["MxKxN", "config", "tiles", "waves"]))
        return 0
    if args.device_info:
        raise SystemExit("tune_fused: --device-info is only for --dry-run; a real run measures its own device")
    if not torch.cuda.is_available():
        raise SystemExit("tune_fused: CUDA is not available; --dry-run prints the wave model's choices without a GPU")
    dtype = getattr(torch, args.dtype)
    reason = fused_cuda.unavailable_reason(registry.Problem("cuda", dtype, 1024, 1024, 1024, 1, (2, 4)))
    if reason:
        raise SystemExit(f"tune_fused: the fused kernel cannot run here: {reason}")
    info = fused_cuda.device_info(torch.cuda.current_device())
    report = {"benchmark": "tune_fused", "device": info.name, "device_info": dataclasses.asdict(info),
              "dtype": args.dtype, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "python": sys.version.split()[0], "results": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_fused_{fused_tiles.device_slug(info.name)}_{report['date']}.json"
    print(f"{info.name}, {args.dtype}, torch {torch.__version__}, {report['date']}", flush=True)
    for shape in shapes:
        result = tune_shape(shape, dtype, info)
        report["results"].append(result)
        path.write_text(json.dumps(report, indent=1))
        print(f"{'x'.join(map(str, shape))}: best {result['best']}, heuristic {result['heuristic']}", flush=True)
    names = [c.name for c in fused_cuda.device_configs(info)]
    print(tabulate(table_rows(report["results"], names),
                   headers=["MxKxN", *(f"{name} us" for name in names), "best", "heuristic", "agree"]))
    print(f"wrote {path}")
    if args.install:
        print(f"installed {install(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
