"""The fused CUDA kernel (kernels/cuda/*.cu, kernels/fused_cuda.py).

Three layers, so that most of it is checked on a machine with no GPU:
- the compression logic (``nm_compress.cuh``) is built for the host with the system C++ compiler
  and compared bit for bit with the reference, splitting each row between two "threads" exactly as
  the kernel does;
- the whole kernel is built with NVRTC for sm_80 and sm_90 (no GPU needed) and must not spill;
- on a CUDA device, the kernel is compared with the reference op end to end.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest
import torch

from lynx_compile.kernels import cuda_rtc, fused_cuda, fused_tiles, reference, registry
from shared import HALF_DTYPES, HAS_CUDA

HOST_WRAPPER = r"""
#include "nm_compress.cuh"
// The kernel's split: K tiles of 64, thread q of a row compresses the 32-wide step q of each tile.
extern "C" void compress_rows(const u16* x, int rows, int k, u16* values, unsigned char* indices, float* scale,
                              int norm_comp) {
  for (int r = 0; r < rows; ++r) {
    RowStats st[2] = {{0.0f, 0.0f, 0, 0}, {0.0f, 0.0f, 0, 0}};
    for (int c = 0; c < k / 32; ++c) {
      u32 words[16], packed[8], meta[2];
      std::memcpy(words, x + (size_t)r * k + 32 * c, sizeof(words));
      compress_chunk(words, packed, meta, st[c % 2], norm_comp != 0);
      for (int j = 0; j < 8; ++j) {
        const size_t out = (size_t)r * (k / 2) + 16 * c + 2 * j;
        const u32 nibble = (meta[j / 4] >> (4 * (j % 4))) & 0xFu;
        values[out] = (u16)(packed[j] & 0xFFFFu);
        values[out + 1] = (u16)(packed[j] >> 16);
        indices[out] = (unsigned char)(nibble & 3u);
        indices[out + 1] = (unsigned char)(nibble >> 2);
      }
    }
    stats_combine(st[0], st[1]);
    scale[r] = norm_comp ? stats_scale(st[0]) : 1.0f;
  }
}
"""


@pytest.fixture(scope="module")
def host_compress(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++ compiler is needed (Inductor's CPU backend needs one too)"
    folder = tmp_path_factory.mktemp("host_compress")
    (folder / "nm_compress.cuh").write_text(fused_cuda.cuda_file("nm_compress.cuh"))
    (folder / "wrapper.cpp").write_text(HOST_WRAPPER)
    libraries = {}
    for dtype in HALF_DTYPES:
        library = folder / f"compress_{str(dtype)[6:]}.so"
        subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-DLYNX_HOST",
                        f"-DIS_BF16={int(dtype == torch.bfloat16)}", f"-I{folder}", str(folder / "wrapper.cpp"),
                        "-o", str(library)], check=True, capture_output=True, text=True)
        libraries[dtype] = ctypes.CDLL(str(library))

    def run(x: torch.Tensor, norm_comp: bool = True):
        rows, k = x.shape
        bits = x.contiguous().view(torch.int16)
        values = torch.empty(rows, k // 2, dtype=torch.int16)
        indices = torch.empty(rows, k // 2, dtype=torch.uint8)
        scale = torch.empty(rows, dtype=torch.float32)
        libraries[x.dtype].compress_rows(ctypes.c_void_p(bits.data_ptr()), rows, k, ctypes.c_void_p(values.data_ptr()),
                                         ctypes.c_void_p(indices.data_ptr()), ctypes.c_void_p(scale.data_ptr()),
                                         int(norm_comp))
        return values.view(x.dtype), indices, scale

    return run


def _awkward_rows(dtype: torch.dtype, k: int = 128) -> torch.Tensor:
    """Ties, signed zeros, NaNs with different payloads, infinities, subnormals, huge and tiny rows."""
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randn(k, generator=gen),
            torch.randint(-2, 3, (k,), generator=gen).float(),      # many exact ties, +-0
            torch.zeros(k),
            torch.full((k,), -0.0),
            torch.randn(k, generator=gen) * 1e-30,                    # far below 2^-50
            torch.randn(k, generator=gen) * 1e-38,                    # subnormal range (bf16)
            torch.randn(k, generator=gen) * 1e30,                     # squares overflow fp32
            torch.randn(k, generator=gen).where(torch.arange(k) != 5, torch.tensor(float("inf")))]
    row = torch.randn(k, generator=gen)
    row[8:12] = float("nan")                                          # a whole group of NaNs
    row[17] = float("-inf")
    rows.append(row)
    big_then_small = torch.randn(k, generator=gen)
    big_then_small[:64] *= 1e20                                       # rescale between the two halves
    rows.append(big_then_small)
    x = torch.stack(rows)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4).where(~x.isinf(), x)
    x = x.to(dtype)
    bits = x.view(torch.int16)
    # Distinct NaN payloads and signs, which the reference ranks equal (lower index wins).
    payloads = torch.tensor([0x7FC1, -0x0001, 0x7F91, 0x7FFF] if dtype == torch.bfloat16
                            else [0x7E01, -0x0101, 0x7C11, 0x7FFF], dtype=torch.int16)
    bits[8, 8:12] = payloads
    return bits.view(dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_host_compression_matches_reference_bit_for_bit(host_compress, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([_awkward_rows(dtype), torch.randn(54, 128, generator=gen).to(dtype)])
    values, indices, scale = host_compress(x)
    ref_values, ref_indices, ref_scale = reference.compress(x, 2, 4)
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16))
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scale, ref_scale, rtol=2e-6, atol=0)


def test_host_compression_without_norm_comp_gives_unit_scale(host_compress):
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(host_compress(x, norm_comp=False)[2], torch.ones(4))


def test_host_compression_on_random_rows_of_every_magnitude(host_compress):
    gen = torch.Generator().manual_seed(1)
    magnitudes = 10.0 ** torch.randint(-35, 36, (64, 1), generator=gen).float()
    x = (torch.randn(64, 256, generator=gen) * magnitudes).to(torch.bfloat16)
    values, indices, scale = host_compress(x)
    ref_values, ref_indices, ref_scale = reference.compress(x, 2, 4)
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16))
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scale, ref_scale, rtol=2e-6, atol=0)


# ---- NVRTC builds (no GPU needed) ----------------------------------------------------------------

NVRTC_REASON = cuda_rtc.nvrtc_unavailable_reason()
needs_nvrtc = pytest.mark.skipif(bool(NVRTC_REASON), reason=f"NVRTC unavailable: {NVRTC_REASON}")


MMA_CONFIGS = tuple(c for c in fused_cuda.TILE_CONFIGS if c.mainloop == "mma")
WGMMA_CONFIGS = tuple(c for c in fused_cuda.TILE_CONFIGS if c.mainloop == "wgmma")
CTA_WGMMA_CONFIGS = tuple(c for c in WGMMA_CONFIGS if c.cluster == 1)
CLUSTER_CONFIG = next(c for c in WGMMA_CONFIGS if c.cluster == 2)
BUILD_TARGETS = [(arch, c) for c in MMA_CONFIGS for arch in ("sm_80", "sm_90")] + [("sm_90", c) for c in WGMMA_CONFIGS]


@needs_nvrtc
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("arch,config", BUILD_TARGETS, ids=[f"{a}-{c.name}" for a, c in BUILD_TARGETS])
def test_kernel_builds_for_each_target_without_spilling(tmp_path, monkeypatch, arch, dtype, config):
    monkeypatch.setenv("LYNX_COMPILE_CACHE", str(tmp_path))
    built = fused_cuda.build(arch, dtype, config)
    assert f"Compiling entry function '{fused_cuda.KERNEL_NAME}' for '{config.arch(arch)}'" in built.log
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in built.log
    # ptxas says when it cannot keep wgmma instructions in flight (it then waits after each one).
    assert "serialized" not in built.log
    # The occupancy model (fused_tiles) takes its registers from REGISTERS_PER_THREAD: still true?
    used = int(re.search(r"Used (\d+) registers", built.log).group(1))
    assert (fused_tiles.REGISTERS_PER_SM // (used * fused_cuda.THREADS)
            == fused_tiles.REGISTERS_PER_SM // config.registers_per_cta), f"{used} registers"
    assert built.cubin[:4] == b"\x7fELF" and fused_cuda.KERNEL_NAME.encode() in built.cubin
    # The second build of the same source and options comes from the disk cache.
    assert fused_cuda.build(arch, dtype, config) == built
    assert len(list(tmp_path.glob("cuda/*.cubin"))) == 1


@needs_nvrtc
def test_build_errors_carry_the_nvrtc_log(tmp_path, monkeypatch):
    monkeypatch.setenv("LYNX_COMPILE_CACHE", str(tmp_path))
    with pytest.raises(cuda_rtc.CudaBuildError, match=r"building CUDA kernel broken for sm_80 failed:\n.*"
                                                      r"undefined_name"):
        cuda_rtc.build('extern "C" __global__ void broken() { undefined_name = 1; }', "broken", "sm_80")


@needs_nvrtc
def test_shared_memory_size_is_checked_against_the_kernel(tmp_path, monkeypatch):
    """``TileConfig.smem_bytes`` is what the launch reserves; the build asserts it equals the kernel's."""
    monkeypatch.setenv("LYNX_COMPILE_CACHE", str(tmp_path))
    for config in (MMA_CONFIGS[1], CTA_WGMMA_CONFIGS[1], CLUSTER_CONFIG):
        defines = config.defines(torch.bfloat16, True) | {"SMEM_BYTES": config.smem_bytes + 16}
        with pytest.raises(cuda_rtc.CudaBuildError, match="smem_bytes must match SharedTiles"):
            cuda_rtc.build(fused_cuda.source(), fused_cuda.KERNEL_NAME, config.arch("sm_90"), defines,
                           headers={name: fused_cuda.cuda_file(name) for name in fused_cuda.HEADERS})


@needs_nvrtc
@pytest.mark.parametrize("arch,config,hmma", [("sm_90", MMA_CONFIGS[0], 64), ("sm_80", MMA_CONFIGS[1], 32)])
def test_main_loop_is_one_block_with_one_barrier(arch, config, hmma):
    """The design the performance depends on, checked in the SASS: per K tile one barrier, the
    planned number of sparse MMAs per warp (2 k32 steps x slabs x n-tiles), and on the common path
    no branch but the loop's own, so that the compression of tile k+1 and the MMAs of tile k sit in
    one basic block that the scheduler can interleave."""
    import sass_counts

    if sass_counts.cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships one)")
    counts = {variant: sass_counts.loop_counts(sass_counts.disassemble(
        fused_cuda.build(arch, torch.bfloat16, config, use_cache=False, variant=variant).cubin))
        for variant in ("kernel", "common_path")}
    common, kernel = counts["common_path"], counts["kernel"]
    assert (common["hmma_sp"], common["barriers"], common["branches"]) == (hmma, 1, 1)
    assert (kernel["hmma_sp"], kernel["barriers"]) == (hmma, 1)
    assert common["opcodes"]["LDGSTS"] == (config.bm + config.bn) * 8 // fused_cuda.THREADS


@needs_nvrtc
@pytest.mark.parametrize("config", CTA_WGMMA_CONFIGS, ids=lambda c: c.name)
def test_wgmma_main_loop_issues_the_tile_and_compresses_while_it_runs(config):
    """The wgmma build's loop: both k32 steps of a tile go to the tensor cores as 2 asynchronous
    HGMMA.SP of the full 64 x BN warpgroup tile, between one WARPGROUP.ARRIVE (wgmma.fence) and the one
    wait at the end of the iteration; the compression of the next tile sits between them, in the
    same basic block on the common path. One barrier, and the shared-memory proxy fence before it."""
    import sass_counts

    if sass_counts.cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships one)")
    instructions = sass_counts.disassemble(
        fused_cuda.build("sm_90", torch.bfloat16, config, use_cache=False, variant="common_path").cubin)
    loop = sass_counts.main_loop(instructions)
    counts = sass_counts.loop_counts(instructions)
    assert (counts["hgmma_sp"], counts["hmma_sp"], counts["barriers"], counts["branches"]) == (2, 0, 1, 1)
    opcodes = [i.opcode for i in loop]
    assert {o for o in opcodes if o.startswith("HGMMA")} == {f"HGMMA.SP.64x{config.bn}x32.F32.BF16"}
    arrive, wait = opcodes.index("WARPGROUP.ARRIVE"), opcodes.index("WARPGROUP.DEPBAR.LE")
    first, last = (i for i, o in enumerate(opcodes) if o.startswith("HGMMA"))
    assert arrive < first < last < wait == len(opcodes) - 2  # then the back edge
    assert opcodes.count("WARPGROUP.ARRIVE") == opcodes.count("WARPGROUP.DEPBAR.LE") == 1
    # The next tile's top-2 selection and packing (integer min/max, byte permutes) run while the
    # products are in flight: after the first HGMMA is issued and before the wait.
    selection = [i for i, o in enumerate(opcodes) if o.startswith(("VIMNMX", "PRMT"))]
    overlapped = [i for i in selection if first < i < wait]
    assert len(selection) >= 80 and len(overlapped) >= 0.95 * len(selection)
    assert opcodes.index("FENCE.VIEW.ASYNC.S") < opcodes.index("BAR.SYNC.DEFER_BLOCKING")
    assert sass_counts.issue_per_scheduler(loop) == 2 * len(loop)  # both warps of a scheduler run it all


@needs_nvrtc
def test_cluster_main_loop_compresses_half_the_rows_into_both_ctas():
    """The 2-CTA cluster build: per K tile one cluster barrier and no CTA barrier; half the X copies;
    warps 4-7 branch over the compression (warp-uniform), which warps 0-3 run while the HGMMAs are in
    flight; and every compressed word (8 packed values, 2 metadata half-words) is stored twice, in
    this CTA's shared memory (STS) and in the peer's (a generic ST to the cluster window)."""
    import sass_counts

    if sass_counts.cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships one)")
    config = CLUSTER_CONFIG
    instructions = sass_counts.disassemble(
        fused_cuda.build("sm_90", torch.bfloat16, config, use_cache=False, variant="common_path").cubin)
    loop = sass_counts.main_loop(instructions)
    counts = sass_counts.loop_counts(instructions)
    assert (counts["hgmma_sp"], counts["barriers"], counts["branches"]) == (2, 0, 2)
    assert (counts["opcodes"]["UCGABAR_ARV"], counts["opcodes"]["UCGABAR_WAIT"]) == (1, 1)
    assert counts["opcodes"]["LDGSTS"] == (config.bm // 2 + config.bn) * 8 // fused_cuda.THREADS
    opcodes = [i.opcode for i in loop]
    arrive, cluster_wait = opcodes.index("UCGABAR_ARV"), opcodes.index("UCGABAR_WAIT")
    first_hgmma = next(i for i, o in enumerate(opcodes) if o.startswith("HGMMA"))
    wgmma_wait = opcodes.index("WARPGROUP.DEPBAR.LE")
    assert arrive < cluster_wait < opcodes.index("WARPGROUP.ARRIVE") < first_hgmma < wgmma_wait
    # The forward branch that skips the compression: right after the HGMMAs, to just before the wait.
    (skip,) = [i for i, ins in enumerate(loop[:-1]) if ins.branch_target() is not None]
    target = [ins.address for ins in loop].index(loop[skip].branch_target())
    assert first_hgmma < skip < target <= wgmma_wait
    compression = opcodes[skip + 1:target]
    selection = [o for o in opcodes if o.startswith(("VIMNMX", "PRMT"))]
    inside = [o for o in compression if o.startswith(("VIMNMX", "PRMT"))]
    assert len(selection) >= 80 and len(inside) >= 0.95 * len(selection)
    local = [o for o in compression if o.split(".")[0] == "STS"]
    remote = [o for o in compression if o.split(".")[0] == "ST"]
    assert (len(local), len(remote)) == (10, 10)
    assert (remote.count("ST.E"), remote.count("ST.E.U16")) == (8, 2)
    # Per scheduler: one warp runs the loop, the other skips the compression.
    assert sass_counts.issue_per_scheduler(loop) == 2 * len(loop) - len(compression)


def test_sass_counts_parses_every_tile_config_name():
    import sass_counts

    for config in fused_cuda.TILE_CONFIGS:
        assert sass_counts.parse_target(f"sm_90:bfloat16:{config.name}") == ("sm_90", torch.bfloat16, config)
    with pytest.raises(SystemExit, match="is not arch:dtype:BMxBNxSTAGES"):
        sass_counts.parse_target("sm_90:bfloat16:128x256x4-wgmma-x2")


def test_unknown_build_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown fused kernel variant 'fast'; variants: kernel, no_selection, "
                                         "common_path"):
        fused_cuda.build("sm_90", torch.bfloat16, fused_cuda.TILE_CONFIGS[0], variant="fast")


def test_a_tile_config_that_does_not_fit_is_refused_before_loading(monkeypatch):
    """The per-shape choice is in test_fused_tiles.py; an explicit ``config`` is checked here."""
    small = fused_tiles.DeviceInfo("Small GPU", 84, 100000, 102400)
    monkeypatch.setattr(fused_cuda, "device_info", lambda index: small)
    with pytest.raises(ValueError, match="^tile configuration 128x256x3 needs 186880 bytes of shared memory per "
                                         "block; Small GPU has 100000$"):
        fused_cuda._loaded(0, torch.bfloat16, "kernel", MMA_CONFIGS[0])


# ---- selection and reasons -----------------------------------------------------------------------

def _problem(**changes):
    fields = dict(device_type="cuda", dtype=torch.bfloat16, m=4096, k=1152, n=1152, batch=1, pattern=(2, 4))
    return registry.Problem(**(fields | changes))


def test_fused_kernel_reasons():
    assert fused_cuda.unavailable_reason(_problem(pattern=(4, 8))) == "mma.sp supports 2:4 only, not 4:8"
    assert fused_cuda.unavailable_reason(_problem(device_type="cpu")) == "needs a CUDA device, got 'cpu'"
    if not HAS_CUDA:
        assert fused_cuda.unavailable_reason(_problem()) == "CUDA is not available"


def test_fused_kernel_is_opt_in():
    assert "fused" in registry.kernel_names()
    assert "fused" not in [k.name for k in registry.auto_candidates("cuda")]


def test_forced_fused_kernel_without_cuda_is_a_clear_error():
    layer = torch.nn.Linear(64, 8)
    fn = torch.compile(layer, backend="rtlynx", options={"min_tokens": 0, "kernel": "fused"})
    with pytest.raises(Exception, match="kernel='fused' cannot run here: needs a CUDA device, got 'cpu'"):
        fn(torch.randn(4, 64))


# ---- on a GPU ------------------------------------------------------------------------------------

# On a CUDA device, the kernel's own reason (compute capability below 8.0, no NVRTC); the gpu marker says
# when there is no CUDA device at all.
FUSED_REASON = fused_cuda.unavailable_reason(_problem()) if HAS_CUDA else ""
needs_fused = pytest.mark.skipif(bool(FUSED_REASON), reason=f"the fused kernel cannot run here: {FUSED_REASON}")


@pytest.mark.gpu("the fused kernel")
@needs_fused
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(128, 64, 256), (1, 192, 8), (300, 1152, 264), (1000, 3072, 1152)])
@pytest.mark.parametrize("extras", ["none", "bias", "bias+lowrank", "no-norm"])
def test_fused_matches_reference_on_gpu(dtype, shape, extras):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    w = torch.randn(n, k, generator=gen).to("cuda", dtype) / k ** 0.5
    bias = torch.randn(n, generator=gen).to("cuda", dtype) if "bias" in extras else None
    lr_down = lr_up = None
    if "lowrank" in extras:
        lr_down = (torch.randn(k, 24, generator=gen) / k ** 0.5).to("cuda", dtype)
        lr_up = (torch.randn(24, n, generator=gen) / 5).to("cuda", dtype)
    norm = extras != "no-norm"
    got = fused_cuda.sparse_matmul(x, w.t(), bias, lr_down, lr_up, n=2, m=4, norm_comp=norm).float()
    expected = reference.sparse_matmul(x, w.t(), bias, lr_down, lr_up, n=2, m=4, norm_comp=norm).float()
    # fp32 accumulation in a different order, plus the low-rank T rounded once to the input dtype.
    tolerance = 2 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tolerance


@pytest.mark.gpu("the fused kernel")
@needs_fused
@pytest.mark.parametrize("config", fused_cuda.TILE_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m, k, n", [(300, 1152, 264), (200, 256, 520)])  # even and odd numbers of N tiles
def test_every_tile_config_matches_reference_on_gpu(config, m, k, n):
    """The per-shape choice may pick any configuration, so each is checked, not only the default."""
    if config not in fused_cuda.device_configs(fused_cuda.device_info(torch.cuda.current_device())):
        pytest.skip(f"{config.name} does not fit this device, or needs compute capability 9.0")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to("cuda", torch.bfloat16)
    bias = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    fused_cuda.launch(x, w, bias, None, None, out, True, config=config)
    expected = reference.sparse_matmul(x, w.t(), bias, n=2, m=4).float()
    tolerance = 2 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= tolerance


@pytest.mark.gpu("the fused kernel")
@needs_fused
def test_fused_writes_every_output_and_propagates_non_finite_rows():
    x = torch.randn(130, 128, device="cuda", dtype=torch.bfloat16)
    x[3, 7] = float("nan")
    x[5, 9] = float("inf")
    w = torch.randn(136, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full((130, 136), float("nan"), device="cuda", dtype=torch.bfloat16)
    out[3:6] = 0  # rows 3 and 5 must become non-finite from the data, not from the poison
    fused_cuda.launch(x, w, None, None, None, out, True)
    expected = reference.sparse_matmul(x, w.t(), n=2, m=4)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite].float(), expected[finite].float(), rtol=2e-2, atol=2e-2)
