"""The Triton kernels compile for real NVIDIA GPUs, on this CPU, and fit their shared memory.

The interpreter runs the kernels' arithmetic but not Triton's compiler, which rejects some things the
interpreter accepts and decides the shared memory a launch needs. Triton compiles for a named
target without a GPU (its ptxas is bundled), so a subprocess without TRITON_INTERPRET builds each
kernel, with the block sizes and launch options its launcher uses at their largest, for the compute
capabilities below.
"""

import textwrap

import pytest

from shared import not_installed, run_compiler_script

pytest.importorskip("triton", reason=not_installed("triton", "triton"))

# Shared memory a block may use (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): 163 KB on 8.0, 99 KB on 8.6 and 8.9, 227 KB on 9.0.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}

# (kernel, compute capability, dtype, variant). The GEMM's shared memory depends on the dtype, so
# every dtype is built for 8.6, the tightest limit; bf16 also for 8.0 and 9.0, whose tensor-core
# paths differ. The compress kernel holds no tile in shared memory: one build per pattern.
BUILDS = [
    ("gemm", 86, "fp32", "2:4"), ("gemm", 86, "fp16", "2:4"), ("gemm", 86, "bf16", "2:4"),
    ("gemm", 80, "bf16", "2:4"), ("gemm", 90, "bf16", "2:4"),
    ("compress", 90, "bf16", "2:4"), ("compress", 80, "fp32", "4:8"), ("compress", 86, "fp16", "1:2"),
]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lynx_compile.kernels import triton_compress as tc, triton_sparse_mm as ts

    TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def signature(fn, pointers, constexprs):
        return {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}

    def build(kind, cap, dt, variant):
        n, m = map(int, variant.split(":"))
        if kind == "gemm":
            fn, options = ts._sparse_mm_kernel, ts.gemm_launch_options(TORCH_DTYPES[dt])
            constexprs = dict(NS=n, MS=m, HAS_LR=True, HAS_BIAS=True, BF16_RNE=False,
                              BLOCK_M=ts.DEFAULT_BLOCK_M, BLOCK_N=ts.DEFAULT_BLOCK_N,
                              BLOCK_K=ts.DEFAULT_BLOCK_K, BLOCK_R=64)
            pointers = dict(val_ptr="*" + dt, idx_ptr="*u8", scale_ptr="*fp32", b_ptr="*" + dt,
                            t_ptr="*fp32", u_ptr="*" + dt, bias_ptr="*" + dt, out_ptr="*" + dt)
        else:
            fn, options = tc._compress_kernel, {}
            constexprs = dict(N=n, M=m, HAS_PERM=True, NORM_COMP=True, PRUNED=False,
                              BLOCK_R=tc.DEFAULT_BLOCK_ROWS, BLOCK_G=tc.DEFAULT_BLOCK_K // m)
            pointers = dict(x_ptr="*" + dt, perm_ptr="*i64", val_ptr="*" + dt, idx_ptr="*u8",
                            scale_ptr="*fp32")
        source = ASTSource(fn, signature(fn, pointers, constexprs), constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32), options=options)
        return {"shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}

    builds = json.loads(sys.argv[1])
    print(json.dumps([build(*b) for b in builds]))
""")


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(map(tuple, BUILDS), run_compiler_script(_SCRIPT, BUILDS)))


@pytest.mark.parametrize("build", BUILDS, ids=lambda b: "-".join(map(str, b)))
def test_kernel_compiles_to_a_cubin_that_fits_shared_memory(compiled, build):
    result = compiled[build]
    assert result["cubin_bytes"] > 0
    assert result["shared"] <= SHARED_LIMIT[build[1]], (
        f"{build}: {result['shared']} B of shared memory, the limit is {SHARED_LIMIT[build[1]]} B")


def test_fp32_gemm_uses_two_pipeline_stages_so_it_fits_8_6(compiled):
    """Triton's default 3 stages need 114,688 B for fp32 64x64x64 tiles, over 8.6's 101,376 B."""
    from lynx_compile.kernels.triton_sparse_mm import gemm_launch_options

    import torch

    assert gemm_launch_options(torch.float32) == {"num_stages": 2}
    assert gemm_launch_options(torch.bfloat16) == {}
    assert compiled[("gemm", 86, "fp32", "2:4")]["shared"] == 65_536
