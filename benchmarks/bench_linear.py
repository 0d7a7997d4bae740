"""Per-layer benchmark of the sparse routes against dense ``F.linear``, on DiT shapes.

    python benchmarks/bench_linear.py                        # CUDA: the DiT shape set, every route
    python benchmarks/bench_linear.py --device cpu --shapes 64x128x64 --routes dense,reference   # smoke

For each (M, K, N) and route it first checks the result against the reference op (max relative
error), then times it: ``triton.testing.do_bench`` medians on CUDA, with inputs rotated through a
pool larger than the L2 cache; ``torch.utils.benchmark`` on the CPU (which shows plumbing, not the
GPU speed-up). It prints a table and writes JSON (device, versions, date, every number).

Routes:
  dense            F.linear (cuBLAS on CUDA)
  naive_cslt       PyTorch's unfused route: top-2 mask, torch._cslt_compress, torch._cslt_sparse_mm, epilogue
  lynx_cusparselt  our kernel "cusparselt": compress + cuSPARSELt + fp32 epilogue
  lynx_triton      our kernel "triton": Triton compress + Triton dense-gather GEMM
  lynx_triton_compiled  F.linear compiled by rtlynx with kernel="triton" (not a default route: one compile per
                   shape). On CUDA Inductor launches the inlined kernels (option triton_op), so lynx_triton (the
                   same kernels launched from Python) minus this is roughly the launch cost that inlining
                   removes. No low-rank term.
  lynx_fused       our kernel "fused": compression in shared memory + mma.sp GEMM + epilogue, one CUDA kernel
  fused_no_select  the fused kernel with selection and norm statistics skipped (wrong results; timing only):
                   lynx_fused minus this is the in-kernel compression cost
  compress         our Triton compress alone (bandwidth against a measured copy)
  reference        the pure-PyTorch reference (CPU smoke runs)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from lynx_compile.kernels import reference

DIT_TOKENS = (1024, 4096, 8192, 16384)
DIT_KN = ((1152, 1152), (1152, 4608), (4608, 1152), (3072, 3072), (3072, 12288), (12288, 3072))
ALL_ROUTES = ("dense", "naive_cslt", "lynx_cusparselt", "lynx_triton", "lynx_triton_compiled", "lynx_fused",
              "fused_no_select", "compress", "reference")
TIMING_ONLY = ("dense", "compress", "fused_no_select")  # routes whose output is not the layer's result
RANK = 64


def parse_shapes(text: str | None, prog: str = "bench_linear") -> list[tuple[int, int, int]]:
    """Comma-separated MxKxN, or the DiT shape set; ``prog`` names the script in the error."""
    if not text:
        return [(m, k, n) for m in DIT_TOKENS for k, n in DIT_KN]
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"{prog}: shape {item!r} is not MxKxN")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _naive_cslt(x, w_t, bias, lr_down, lr_up):
    values, indices, scale = reference.compress(x, 2, 4)
    pruned = reference.decompress(values, indices, 2, 4)
    y = torch._cslt_sparse_mm(torch._cslt_compress(pruned), w_t.contiguous()).float() * scale[:, None]
    if lr_down is not None:
        y = y + (x.float() @ lr_down.float()) @ lr_up.float()
    return (y + bias.float()).to(x.dtype)


def _require(unavailable_reason, device: str, dtype: torch.dtype) -> None:
    """Raise with the kernel's own reason when it cannot run a 2:4 GEMM of this device and dtype."""
    from lynx_compile.kernels import registry

    reason = unavailable_reason(registry.Problem(device, dtype, 1024, 1024, 1024, 1, (2, 4)))
    if reason:
        raise RuntimeError(reason)


def _compiled_triton_layer(device: str):
    """``F.linear`` compiled by the rtlynx backend with the Triton kernel, as a route."""
    import lynx_compile  # noqa: F401  (registers the backend)
    from lynx_compile.kernels import triton_compress

    reason = triton_compress.triton_unavailable_reason(device)
    if reason:
        raise RuntimeError(reason)
    torch._dynamo.reset()  # one compile per shape, so the recompile limit never falls back to eager
    compiled = torch.compile(lambda x, w_t, bias: F.linear(x, w_t.t(), bias), backend="rtlynx", dynamic=False,
                             options={"kernel": "triton", "min_tokens": 0})

    def run(x, w_t, bias, lr_down, lr_up):
        if lr_down is not None:
            raise ValueError("a compiled layer takes its low-rank term from a calibration plan; use --low-rank off")
        return compiled(x, w_t, bias)

    return run


def route_fn(route: str, device: str, dtype: torch.dtype):
    """(callable(x, w_t, bias, lr_down, lr_up) -> y) for a route, or raise with the reason it cannot run."""
    if route == "dense":
        return lambda x, w_t, bias, lr_down, lr_up: F.linear(x, w_t.t(), bias)
    if route == "reference":
        return lambda x, w_t, bias, lr_down, lr_up: reference.sparse_matmul(x, w_t, bias, lr_down, lr_up, n=2, m=4)
    if route in ("naive_cslt", "lynx_cusparselt"):
        from lynx_compile.kernels import cusparselt

        _require(cusparselt.unavailable_reason, device, dtype)
    if route == "naive_cslt":
        return _naive_cslt
    if route == "lynx_cusparselt":
        return lambda x, w_t, bias, lr_down, lr_up: cusparselt.sparse_matmul(x, w_t, bias, lr_down, lr_up, n=2, m=4)
    if route == "lynx_triton":
        from lynx_compile.kernels import triton_sparse_mm

        return lambda x, w_t, bias, lr_down, lr_up: triton_sparse_mm.sparse_matmul(x, w_t, bias, lr_down, lr_up,
                                                                                   n=2, m=4)
    if route == "lynx_triton_compiled":
        return _compiled_triton_layer(device)
    if route in ("lynx_fused", "fused_no_select"):
        from lynx_compile.kernels import fused_cuda

        _require(fused_cuda.unavailable_reason, device, dtype)
    if route == "lynx_fused":
        return lambda x, w_t, bias, lr_down, lr_up: fused_cuda.sparse_matmul(x, w_t, bias, lr_down, lr_up, n=2, m=4)
    if route == "fused_no_select":
        def no_select(x, w_t, bias, lr_down, lr_up):
            out = torch.empty(x.shape[0], w_t.shape[1], dtype=x.dtype, device=x.device)
            return fused_cuda.launch(x, w_t.t(), bias, None, None, out, True, variant="no_selection")
        return no_select
    if route == "compress":
        from lynx_compile.kernels import triton_compress

        return lambda x, w_t, bias, lr_down, lr_up: triton_compress.compress(x, 2, 4)[0]
    raise AssertionError(route)


def time_ms(fn, pools, device: str) -> float:
    """Median milliseconds of ``fn(*pool[i])``, cycling through the pools so caches stay cold."""
    state = {"i": 0}

    def call():
        args = pools[state["i"] % len(pools)]
        state["i"] += 1
        return fn(*args)

    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, return_mode="median"))
    from torch.utils import benchmark

    return benchmark.Timer("call()", globals={"call": call}).blocked_autorange(min_run_time=0.2).median * 1e3


def make_pools(m, k, n, dtype, device, low_rank: bool, count: int):
    gen = torch.Generator(device="cpu").manual_seed(0)
    pools = []
    for _ in range(count):
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)
        bias = torch.randn(n, generator=gen).to(device, dtype)
        lr = ((torch.randn(k, RANK, generator=gen) / k**0.5).to(device, dtype),
              (torch.randn(RANK, n, generator=gen) / RANK**0.5).to(device, dtype)) if low_rank else (None, None)
        pools.append((x, w.t(), bias, *lr))
    return pools


def pool_count(m, k, n, dtype, device) -> int:
    """How many input sets to rotate through so that together they exceed twice a 50 MB L2 cache."""
    bytes_per_set = (m * k + k * n + m * n) * dtype.itemsize
    return 1 if device == "cpu" else max(2, int(2 * 60e6 // bytes_per_set) + 1)


def bench_shape(shape, routes, dtype, device, low_rank: bool):
    m, k, n = shape
    pools = make_pools(m, k, n, dtype, device, low_rank, pool_count(m, k, n, dtype, device))
    x, w_t, bias, lr_down, lr_up = pools[0]
    expected = reference.sparse_matmul(x, w_t, bias, lr_down, lr_up, n=2, m=4).float()
    rows = {}
    for route in routes:
        if low_rank and route in TIMING_ONLY:
            continue
        try:
            fn = route_fn(route, device, dtype)
            out = fn(*pools[0])
            if route not in TIMING_ONLY:
                error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
            else:
                error = None
            ms = time_ms(fn, pools, device)
            rows[route] = {"ms": ms, "max_rel_error": error}
        except Exception as exc:  # a route that cannot run here is reported, not fatal
            rows[route] = {"ms": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    if "compress" in rows and rows["compress"].get("ms"):
        copy_ms = time_ms(lambda x, *rest: x.clone(), pools, device)
        moved = m * k * dtype.itemsize + m * k // 2 * (dtype.itemsize + 1) + m * 4  # read x; write values, idx, scale
        rows["compress"]["bandwidth_vs_copy"] = (moved / rows["compress"]["ms"]) / (2 * m * k * dtype.itemsize / copy_ms)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shapes", help="comma-separated MxKxN (default: the DiT shape set)")
    parser.add_argument("--routes", default="dense,naive_cslt,lynx_cusparselt,lynx_triton,lynx_fused,fused_no_select,compress")
    parser.add_argument("--low-rank", choices=("both", "off", "on"), default="both")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_linear: CUDA is not available; use --device cpu for a smoke run")
    dtype = getattr(torch, args.dtype)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    for route in routes:
        if route not in ALL_ROUTES:
            raise SystemExit(f"bench_linear: unknown route {route!r}; routes: {', '.join(ALL_ROUTES)}")
    variants = {"both": (False, True), "off": (False,), "on": (True,)}[args.low_rank]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    results = []
    for shape in parse_shapes(args.shapes):
        for low_rank in variants:
            rows = bench_shape(shape, routes, dtype, args.device, low_rank)
            results.append({"shape": list(shape), "low_rank": RANK if low_rank else 0, "routes": rows})
    dense = {tuple(r["shape"]): r["routes"].get("dense", {}).get("ms") for r in results if not r["low_rank"]}
    table = []
    for r in results:
        base = dense.get(tuple(r["shape"]))
        for route, row in r["routes"].items():
            speedup = base / row["ms"] if base and row.get("ms") and route != "dense" else None
            table.append(["x".join(map(str, r["shape"])), r["low_rank"], route,
                          f"{row['ms']:.4f}" if row.get("ms") else row.get("error", "")[:60],
                          f"{speedup:.2f}x" if speedup else "", row.get("max_rel_error", "")])
    report = {
        "benchmark": "bench_linear", "device": device_name, "device_type": args.device, "dtype": args.dtype,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "python": sys.version.split()[0], "baseline": "dense F.linear in the same run", "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_linear_{args.device}_{report['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    text = tabulate(table, headers=["MxKxN", "rank", "route", "ms (median)", "vs dense", "max rel err"])
    (args.out / f"{stem}.md").write_text(f"{device_name}, {args.dtype}, {report['date']}\n\n{text}\n")
    print(f"{device_name}, {args.dtype}, torch {torch.__version__}, {report['date']}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
