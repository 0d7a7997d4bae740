"""End-to-end DiT forward: rtlynx against plain Inductor, on a Flux-shaped transformer (random weights).

    python benchmarks/bench_dit.py                         # CUDA, bf16: 1024^2 image (4096 tokens) + 512 text
                                                           # tokens, CFG batch 2, 4 double + 8 single blocks
    python benchmarks/bench_dit.py --double 19 --single 38 # the full Flux depth (about 24 GB of bf16 weights)
    python benchmarks/bench_dit.py --device cpu --tiny     # plumbing only

It compiles the same model twice, with ``backend="inductor"`` and ``backend="rtlynx"``, records the
compile times, then times the forward (CUDA events, median of ``--iters`` after warm-up), checks the
relative difference of the outputs, prints a table and writes JSON with the device, the shapes,
the options, whether CUDA graphs were used, and the rewrite summary.
"""

from __future__ import annotations

import argparse
from collections import Counter
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import lynx_compile


def build(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    if args.tiny:
        config = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=16, in_channels=16, axes_dims_rope=(4, 6, 6))
        image_tokens, text_tokens = 64, 16
    else:
        config = dict(num_layers=args.double, num_single_layers=args.single)
        image_tokens, text_tokens = (args.resolution // 16) ** 2, args.text_tokens
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    cfg = model.config
    batch = 2  # classifier-free guidance
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    inputs = dict(
        hidden_states=rand(batch, image_tokens, cfg.in_channels),
        encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
        pooled_projections=rand(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=torch.zeros(image_tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    return model, inputs, dict(config=dict(cfg), image_tokens=image_tokens, text_tokens=text_tokens, batch=batch)


def timed_ms(fn, iters: int, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compile_and_time(model, inputs, backend, options, mode, iters, device):
    torch._dynamo.reset()
    kwargs = {"options": options} if options else {}
    if mode:
        kwargs = {"mode": mode} if backend == "inductor" else {"options": {**(options or {}), "mode": mode}}
    compiled = torch.compile(model, backend=backend, **kwargs)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(**inputs)[0]
        if device == "cuda":
            torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        ms = timed_ms(lambda: compiled(**inputs), iters, device)
    return out, compile_s, ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks (Flux: 19)")
    parser.add_argument("--single", type=int, default=8, help="single-stream blocks (Flux: 38)")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (tokens = (side/16)^2)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="a tiny config for a plumbing check")
    parser.add_argument("--mode", default=None, help="torch.compile mode for both (e.g. reduce-overhead = CUDA graphs)")
    parser.add_argument("--options", default='{"pattern": "2:4"}', help="rtlynx options as JSON")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_dit: CUDA is not available; use --device cpu --tiny for a plumbing check")
    dtype = getattr(torch, args.dtype)
    options = json.loads(args.options)
    model, inputs, shapes = build(args, args.device, dtype)
    dense, dense_compile_s, dense_ms = compile_and_time(model, inputs, "inductor", None, args.mode, args.iters,
                                                        args.device)
    lynx_compile.clear_reports()
    sparse, lynx_compile_s, lynx_ms = compile_and_time(model, inputs, "rtlynx", options, args.mode, args.iters,
                                                       args.device)
    reports = lynx_compile.reports()
    rel = ((sparse.float() - dense.float()).norm() / dense.float().norm()).item()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "bench_dit", "model": "FluxTransformer2DModel (random weights)", "device": device_name,
        "dtype": args.dtype, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "cuda_graphs": args.mode == "reduce-overhead", "mode": args.mode, "options": options, **shapes,
        "baseline": "plain Inductor (torch.compile backend='inductor') in the same run",
        "inductor": {"compile_s": dense_compile_s, "forward_ms": dense_ms},
        "rtlynx": {"compile_s": lynx_compile_s, "forward_ms": lynx_ms, "speedup": dense_ms / lynx_ms,
                   "rel_l2_vs_inductor": rel, "graphs": len(reports),
                   "gemms": sum(len(r.records) for r in reports), "rewritten": sum(r.num_rewritten for r in reports),
                   "selection": dict(Counter(x.selection for r in reports for x in r.records)),
                   "dense_reasons": dict(Counter(x.reason for r in reports for x in r.records if not x.rewritten)
                                         .most_common(8))},
    }
    result["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in result["config"].items()
                        if isinstance(v, (int, float, str, bool, list, tuple)) or v is None}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_dit_{args.device}_{result['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    rows = [["inductor", f"{dense_compile_s:.1f}", f"{dense_ms:.3f}", "1.00x", ""],
            ["rtlynx", f"{lynx_compile_s:.1f}", f"{lynx_ms:.3f}", f"{dense_ms / lynx_ms:.2f}x", f"{rel:.4f}"]]
    print(f"{device_name}, {args.dtype}, batch {shapes['batch']}, {shapes['image_tokens']} image + "
          f"{shapes['text_tokens']} text tokens, CUDA graphs {'on' if result['cuda_graphs'] else 'off'}; "
          f"{result['rtlynx']['rewritten']}/{result['rtlynx']['gemms']} GEMMs rewritten")
    print(tabulate(rows, headers=["backend", "compile s", "forward ms (median)", "speed-up", "rel L2 vs inductor"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
