"""The Triton sparse GEMM multiplies bf16 / fp16 on the tensor cores, fp32 exactly, and M=0 launches nothing.

Only Triton's CPU interpreter needs the operands widened to fp32 (it holds bf16 as raw bits); the
compiled kernel must hand bf16 / fp16 tiles to ``tl.dot`` as they are, with an fp32 accumulator,
or the main loop runs as one fp32 FMA per product on the CUDA cores. A subprocess without
TRITON_INTERPRET compiles the kernel to PTX on this CPU (as tests/test_triton_aot.py does), with the
specialisation and the largest block sizes its launcher uses, and counts the instructions.

Measured with Triton 3.7.1, 64x64x64 tiles, 4 warps (128 threads), per (arch, dtype):

* bf16 / fp16, before (operands widened by ``to_f32``, ``input_precision="ieee"``): 0 ``mma.sync``,
  0 ``wgmma``, 2,048 ``fma.rn.f32`` (64*64*64 products / 128 threads) on sm_80 and sm_90; 4,128
  with the low-rank term.
* bf16 / fp16, after: sm_80 32 ``mma.sync.aligned.m16n8k16``, sm_90 4 ``wgmma.mma_async
  .m64n64k16``; 32 ``fma.rn.f32`` left (the epilogue's ``acc * scale + bias``, one per output
  element of a thread), 2,080 with the low-rank term, whose ``(x @ lr_down) @ lr_up`` stays an fp32
  ``ieee`` product (``x @ lr_down`` is fp32 by design, as in the reference).
* fp32: 0 tensor-core instructions and 2,048 ``fma.rn.f32`` (4,128 with the low-rank term),
  before and after: the exact path (no TF32), whose PTX the change leaves as it was.
"""

import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (optional dependency: pip install '.[triton]')")

from lynx_compile.kernels import triton_compress as tc  # noqa: E402
from lynx_compile.kernels import triton_sparse_mm as tsm  # noqa: E402
from shared import run_compiler_script  # noqa: E402

BLOCK = 64            # DEFAULT_BLOCK_M/N/K and the cap of BLOCK_R: the largest tiles the launcher uses
THREADS = 4 * 32      # Triton's default num_warps=4, which the launcher keeps
# One fp32 FMA per product of a 64x64x64 tile, spread over the threads: what a tl.dot on the CUDA
# cores costs per K step (the old bf16 / fp16 main loop, and the fp32 path).
FMA_PER_DOT = BLOCK * BLOCK * BLOCK // THREADS          # 2,048
# Elementwise fp32 FMAs the epilogue may hold: one per output element of a thread (acc * scale +
# bias, measured 32), doubled for slack across Triton versions. Far below FMA_PER_DOT.
EPILOGUE_FMA = 2 * BLOCK * BLOCK // THREADS              # 64

# (compute capability, dtype, HAS_LR). HAS_BIAS is always on, as in the fused layer.
BUILDS = [(cap, dt, lr) for cap in (80, 90) for dt in ("bf16", "fp16", "fp32") for lr in (False, True)]

_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lynx_compile.kernels import triton_compress as tc, triton_sparse_mm as ts

    TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def build(cap, dt, has_lr):
        fn = ts._sparse_mm_kernel
        constexprs = dict(NS=2, MS=4, HAS_LR=has_lr, HAS_BIAS=True, BF16_RNE=False,
                          BLOCK_M=ts.DEFAULT_BLOCK_M, BLOCK_N=ts.DEFAULT_BLOCK_N,
                          BLOCK_K=ts.DEFAULT_BLOCK_K, BLOCK_R=64)
        pointers = dict(val_ptr="*" + dt, idx_ptr="*u8", scale_ptr="*fp32", b_ptr="*" + dt,
                        t_ptr="*fp32", u_ptr="*" + dt, bias_ptr="*" + dt, out_ptr="*" + dt)
        signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32),
                                  options=ts.gemm_launch_options(TORCH_DTYPES[dt]))
        ptx = compiled.asm["ptx"]
        count = lambda pattern: len(re.findall(pattern, ptx))
        return {"mma": count(r"\\bmma\\.sync\\.aligned\\.\\S+"), "wgmma": count(r"\\bwgmma\\.mma_async\\.\\S+"),
                "fma": count(r"\\bfma\\.rn\\.f32\\b"), "num_warps": compiled.metadata.num_warps,
                "tc_shapes": sorted(set(re.findall(r"\\b(?:wgmma\\.mma_async|mma\\.sync)\\.\\S+", ptx)))}

    builds = json.loads(sys.argv[1])
    print(json.dumps({"interpreted": bool(tc.INTERPRETED), "builds": [build(*b) for b in builds]}))
""")


@pytest.fixture(scope="module")
def ptx_counts():
    result = run_compiler_script(_SCRIPT, BUILDS)
    assert result["interpreted"] is False, "the compiled kernels must see INTERPRETED == False"
    return dict(zip(BUILDS, result["builds"]))


def _id(build):
    cap, dt, lr = build
    return f"sm{cap}-{dt}" + ("-lowrank" if lr else "")


@pytest.mark.parametrize("build", [b for b in BUILDS if b[1] != "fp32"], ids=_id)
def test_bf16_fp16_gemm_runs_on_tensor_cores(ptx_counts, build):
    cap, dt, has_lr = build
    got = ptx_counts[build]
    operands = {"bf16": ".f32.bf16.bf16", "fp16": ".f32.f16.f16"}[dt]   # fp32 accumulator, dt operands
    tensor_core = [s for s in got["tc_shapes"] if operands in s]
    assert got["mma"] + got["wgmma"] > 0 and tensor_core, (
        f"{_id(build)}: no tensor-core instruction on {dt} operands in the PTX: {got}")
    if cap == 80:
        assert got["wgmma"] == 0 and got["mma"] > 0
    # The main loop holds no per-product fp32 FMA any more. With the low-rank term the epilogue's
    # (x @ lr_down) @ lr_up is still one fp32 "ieee" dot on the CUDA cores (x @ lr_down is fp32, as
    # in the reference): one FMA_PER_DOT for it, not two as before (4,128).
    limit = EPILOGUE_FMA + (FMA_PER_DOT if has_lr else 0)
    assert got["fma"] <= limit, (
        f"{_id(build)}: {got['fma']} fma.rn.f32 in the PTX (limit {limit}): the {dt} main loop runs "
        f"on the CUDA cores (one FMA per product is {FMA_PER_DOT})")


@pytest.mark.parametrize("build", [b for b in BUILDS if b[1] == "fp32"], ids=_id)
def test_fp32_gemm_keeps_its_exact_fma_path(ptx_counts, build):
    """fp32 stays ``input_precision="ieee"``: no TF32 tensor cores, one fp32 FMA per product."""
    got = ptx_counts[build]
    assert got["mma"] == 0 and got["wgmma"] == 0, f"{_id(build)}: fp32 went to the tensor cores (TF32): {got}"
    dots = 2 if build[2] else 1                     # main loop, plus the low-rank dot
    assert dots * FMA_PER_DOT <= got["fma"] <= dots * FMA_PER_DOT + EPILOGUE_FMA, got


def test_interpreted_flag_matches_how_the_kernels_were_decorated():
    """The constexpr that picks the interpreter's widened dot is True exactly where the kernels run
    in the interpreter (the subprocess above checks it is False for compiled kernels)."""
    assert bool(tc.INTERPRETED) == tc.is_interpreted(tsm._sparse_mm_kernel) == tc.is_interpreted(tc._compress_kernel)


# ---- M = 0: an empty result, and no kernel launched ----

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(bool(tc.triton_unavailable_reason(DEVICE)),
                                   reason=f"Triton kernels cannot run here: {tc.triton_unavailable_reason(DEVICE)}")


class _Launched(AssertionError):
    pass


@pytest.fixture
def no_launch(monkeypatch):
    """Every Triton launch of both launchers goes through ``launchable``: make it raise."""
    def refuse(kernel, traceable):
        raise _Launched(f"a kernel was launched: {kernel}")

    monkeypatch.setattr(tsm, "launchable", refuse)
    monkeypatch.setattr(tc, "launchable", refuse)
    with torch.device(DEVICE):
        yield


@needs_kernels
def test_the_launch_guard_catches_a_launch(no_launch):
    """Control for the tests below: with one row, the patched launcher is reached."""
    with pytest.raises(_Launched):
        tsm.sparse_matmul(torch.randn(1, 64), torch.randn(64, 32), n=2, m=4)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("traceable", [False, True], ids=["eager", "traceable"])
def test_empty_x_returns_empty_result_without_a_launch(no_launch, dtype, traceable):
    k, n_out, rank = 64, 48, 8
    other, bias = torch.randn(k, n_out).to(dtype), torch.randn(n_out).to(dtype)
    lr_down, lr_up = torch.randn(k, rank), torch.randn(rank, n_out)
    perm = torch.randperm(k)

    y = tsm.sparse_matmul(torch.randn(0, k).to(dtype), other, bias, lr_down, lr_up, n=2, m=4, traceable=traceable)
    assert y.shape == (0, n_out) and y.dtype == dtype and y.device.type == DEVICE

    y = tsm.sparse_matmul(torch.randn(0, k).to(dtype), other, n=2, m=4, perm=perm, traceable=traceable)
    assert y.shape == (0, n_out) and y.dtype == dtype

    y = tsm.sparse_matmul(torch.randn(3, 0, k).to(dtype), other, bias, n=2, m=4, traceable=traceable)
    assert y.shape == (3, 0, n_out) and y.dtype == dtype

    y = tsm.sparse_matmul(torch.randn(2, 0, k).to(dtype), torch.randn(2, k, n_out).to(dtype), n=2, m=4,
                          traceable=traceable)
    assert y.shape == (2, 0, n_out) and y.dtype == dtype

    values, indices, scale = tc.compress(torch.randn(0, k).to(dtype), 2, 4, traceable=traceable)
    assert values.shape == indices.shape == (0, k // 2) and scale.shape == (0,) and values.dtype == dtype
    y = tsm.sparse_mm(values, indices, scale, other, bias, n=2, m=4)
    assert y.shape == (0, n_out) and y.dtype == dtype
