"""The fused CUDA kernel: 2:4 compression of X in shared memory + ``mma.sp`` GEMM + fused epilogue.

``cuda/fused_nm_gemm.cu`` holds the kernel and its design. This module builds it with NVRTC
(``cuda_rtc``) once per (architecture, dtype, tiles) and launches it, with the tile configuration that
``fused_tiles`` chooses for each GEMM shape (a tuned table, else a wave model).

Why its limits:
- ``mma.sp`` is 2:4 only and fp16/bf16 here (sm_80+).
- K must be a multiple of the 64-wide K tile and N of 8: loads are 16-byte ``cp.async`` copies
  and the output is written in pairs.
- the low-rank term enters as ``T = x @ lr_down`` (one small cuBLAS GEMM, rounded to the input dtype)
  and is multiplied by ``lr_up`` on the tensor cores in the epilogue, so that there is no full-size
  extra output and no extra pass over Y; the rounding of T differs from the reference's fp32 T
  by at most one rounding of the low-rank term.

The kernel is opt-in (``kernel="fused"``) and not chosen by ``kernel="auto"`` until a GPU benchmark
shows that it beats the cuSPARSELt route (see benchmarks/NOTES.md).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch
import torch.nn.functional as F

from . import contract, cuda_rtc, fused_tiles

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_K = 64
THREADS = 256
KERNEL_NAME = "fused_nm_gemm"


# Two main loops: "mma" (mma.sp.sync, warp-level, sm_80 and newer) and "wgmma" (wgmma.mma_async.sp,
# warpgroup-level and asynchronous, sm_90a: compute capability 9.0 exactly). See the .cu file.
MAINLOOPS = ("mma", "wgmma")

# ptxas's registers per thread (NVRTC 12.9; for "mma", sm_80 and sm_90 alike), by (main loop, BM, BN,
# cluster size): the occupancy model's input, in fused_tiles. The build test checks that they still
# give the same CTAs per SM.
REGISTERS_PER_THREAD = {("mma", 128, 256, 1): 240, ("mma", 128, 128, 1): 180,
                        ("wgmma", 128, 256, 1): 254, ("wgmma", 128, 128, 1): 194, ("wgmma", 128, 256, 2): 252}


@dataclass(frozen=True)
class TileConfig:
    bm: int
    bn: int
    stages: int
    mainloop: str = "mma"
    # 2: clusters of two CTAs on the same rows and adjacent N tiles share one compression of X
    # (CLUSTER_SHARE in the .cu file; wgmma only).
    cluster: int = 1

    def __post_init__(self):
        if self.mainloop not in MAINLOOPS:
            raise ValueError(f"unknown fused main loop {self.mainloop!r}; main loops: {', '.join(MAINLOOPS)}")
        if self.cluster not in (1, 2) or (self.cluster == 2 and self.mainloop != "wgmma"):
            raise ValueError(f"cluster={self.cluster}: the fused kernel runs clusters of 1, or of 2 with the "
                             "wgmma main loop")

    @property
    def name(self) -> str:
        """"128x256x3" (mma.sp), "128x256x4-wgmma", "128x256x4-wgmma-c2" (2-CTA cluster)."""
        return (f"{self.bm}x{self.bn}x{self.stages}" + ("" if self.mainloop == "mma" else f"-{self.mainloop}")
                + ("" if self.cluster == 1 else f"-c{self.cluster}"))

    @property
    def registers_per_cta(self) -> int:
        """An unknown tile is taken to use the most a thread can have (255)."""
        return REGISTERS_PER_THREAD.get((self.mainloop, self.bm, self.bn, self.cluster), 255) * THREADS

    def ctas(self, m: int, n: int) -> int:
        """CTAs in the grid: a cluster's CTAs share a row of tiles, so N tiles round up to whole clusters."""
        tiles_n = -(-n // self.bn)
        return -(-m // self.bm) * self.cluster * -(-tiles_n // self.cluster)

    @property
    def smem_bytes(self) -> int:
        """Must match ``SharedTiles`` in the .cu file, plus the wgmma build's alignment slack."""
        wgmma = self.mainloop == "wgmma"
        x_tiles = self.stages * (self.bm // self.cluster) * (BLOCK_K + 8) * 2  # this CTA's share of the X rows
        w_tiles = self.stages * self.bn * (BLOCK_K if wgmma else BLOCK_K + 8) * 2  # wgmma: 128-byte swizzled rows
        compressed = 2 * (self.bm // 16) * (BLOCK_K // 32) * 32 * (4 * 4 + 2 * 2)  # double-buffered
        return x_tiles + w_tiles + compressed + 4 * self.bm + (1024 - 16 if wgmma else 0)

    def arch(self, device_arch: str) -> str:
        """The NVRTC target: the wgmma build needs sm_90a, whose code runs on compute capability 9.0 only."""
        if self.mainloop == "wgmma":
            if device_arch not in ("sm_90", "sm_90a"):
                raise ValueError(f"tile configuration {self.name} needs sm_90 (wgmma.mma_async.sp), not {device_arch}")
            return "sm_90a"
        return device_arch

    def defines(self, dtype: torch.dtype, ordered_metadata: bool) -> dict[str, int]:
        return {"BM": self.bm, "BN": self.bn, "STAGES": self.stages, "IS_BF16": int(dtype == torch.bfloat16),
                "ORDERED_METADATA": int(ordered_metadata), "MAINLOOP_WGMMA": int(self.mainloop == "wgmma"),
                "CLUSTER_SHARE": int(self.cluster == 2), "SMEM_BYTES": self.smem_bytes}


# Largest first, and on sm_90 wgmma first: fused_tiles gives ties to the earlier one. The 2-CTA cluster
# comes after the wgmma configurations of its tile, so the model never prefers it (it ties at best:
# its grid rounds N tiles up to pairs); only a tuned table, which times it, can choose it.
TILE_CONFIGS = (TileConfig(128, 256, 4, "wgmma"), TileConfig(128, 128, 4, "wgmma"), TileConfig(128, 256, 4, "wgmma", 2),
                TileConfig(128, 256, 3), TileConfig(128, 128, 3), TileConfig(128, 128, 2))


def configs_for(capability: tuple[int, int]) -> tuple[TileConfig, ...]:
    """The configurations a device of this compute capability can build: wgmma on 9.0 only."""
    return tuple(c for c in TILE_CONFIGS if c.mainloop == "mma" or tuple(capability) == (9, 0))


HEADERS = ("nm_compress.cuh", "tile_layout.cuh", "wgmma_sp.cuh")


def cuda_file(name: str) -> str:
    return resources.files(__package__).joinpath("cuda", name).read_text()


def source() -> str:
    return cuda_file("fused_nm_gemm.cu")


def ordered_metadata_supported() -> bool:
    """``mma.sp::ordered_metadata`` needs PTX ISA 8.5 (CUDA 12.5)."""
    return cuda_rtc.nvrtc_version() >= (12, 5)


# Builds other than the kernel itself are instruments, with wrong results: "no_selection" times the
# kernel without selection and statistics (bench_linear.py), "common_path" drops the rare branches so
# that a static instruction count is that of the common path (sass_counts.py).
VARIANTS = {"kernel": {}, "no_selection": {"TIMING_SKIP_SELECTION": 1}, "common_path": {"SASS_COMMON_PATH": 1}}


def build(arch: str, dtype: torch.dtype, config: TileConfig, use_cache: bool = True,
          variant: str = "kernel") -> cuda_rtc.Build:
    if variant not in VARIANTS:
        raise ValueError(f"unknown fused kernel variant {variant!r}; variants: {', '.join(VARIANTS)}")
    defines = config.defines(dtype, ordered_metadata_supported()) | VARIANTS[variant]
    return cuda_rtc.build(source(), KERNEL_NAME, config.arch(arch), defines,
                          headers={name: cuda_file(name) for name in HEADERS}, use_cache=use_cache)


@lru_cache(maxsize=None)
def device_info(device_index: int) -> fused_tiles.DeviceInfo:
    return fused_tiles.DeviceInfo.of(torch.device("cuda", device_index))


def device_configs(info: fused_tiles.DeviceInfo) -> tuple[TileConfig, ...]:
    """The configurations this device can build and hold in shared memory."""
    return fused_tiles.fitting(configs_for(info.capability), info.max_smem_per_block)


# Configurations that failed the compile-time self-test, per (device index, dtype): {name: why}.
_REJECTED: dict[tuple[int, torch.dtype], dict[str, str]] = {}


def usable_configs(device_index: int, dtype: torch.dtype) -> tuple[TileConfig, ...]:
    rejected = _REJECTED.get((device_index, dtype), {})
    return tuple(c for c in configs_for(device_info(device_index).capability) if c.name not in rejected)


def choose_config(device_index: int, dtype: torch.dtype, m: int, n: int, k: int) -> tuple[TileConfig, str]:
    """The tile configuration for one GEMM on one device, and why (tuned table or wave model)."""
    return fused_tiles.choose(device_info(device_index), dtype, m, n, k, usable_configs(device_index, dtype))


def self_test(device: torch.device, dtype: torch.dtype, check) -> str:
    """Check every configuration this device can use (``check(run)``: "" or why the result is wrong).

    The choice is per shape, so one good configuration says nothing about the others. A configuration
    that fails is not used on this device from then on, with a warning; the kernel fails its
    self-test only when none passes.
    """
    index = torch.cuda.current_device() if device.index is None else device.index
    configs = device_configs(device_info(index))
    failures = {c.name: check(functools.partial(sparse_matmul, config=c)) for c in configs}
    _REJECTED[(index, dtype)] = {name: why for name, why in failures.items() if why}
    if len(_REJECTED[(index, dtype)]) == len(configs):
        return "; ".join(f"{name}: {why}" for name, why in failures.items()) or "no tile configuration fits"
    for name, why in _REJECTED[(index, dtype)].items():
        warnings.warn(f"fused kernel: tile configuration {name} failed its self-test on cuda:{index} ({why}); "
                      f"the other configurations are used", stacklevel=2)
    return ""


def unavailable_reason(problem) -> str:
    """"" when this kernel can run ``problem`` (a ``registry.Problem``), else why not."""
    if problem.pattern != (2, 4):
        return f"mma.sp supports 2:4 only, not {problem.pattern[0]}:{problem.pattern[1]}"
    if problem.device_type != "cuda":
        return f"needs a CUDA device, got {problem.device_type!r}"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return f"compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
    if problem.dtype not in SUPPORTED_DTYPES:
        return f"dtype {contract.dtype_name(problem.dtype)} unsupported (supported: float16, bfloat16)"
    if problem.batch != 1:
        return "batched GEMMs (bmm) are not supported by the fused kernel"
    if problem.k % BLOCK_K:
        return f"K={problem.k} is not a multiple of {BLOCK_K}"
    if isinstance(problem.n, int) and problem.n % 8:
        return f"N={problem.n} is not a multiple of 8"
    info = device_info(torch.cuda.current_device())
    if not device_configs(info):
        return (f"needs {TILE_CONFIGS[-1].smem_bytes} bytes of shared memory per block, the device has "
                f"{info.max_smem_per_block}")
    return cuda_rtc.nvrtc_unavailable_reason()


@lru_cache(maxsize=None)
def _loaded(device_index: int, dtype: torch.dtype, variant: str, config: TileConfig) -> cuda_rtc.LoadedKernel:
    """The kernel built for device ``device_index`` and loaded into its primary context."""
    info = device_info(device_index)
    if config.smem_bytes > info.max_smem_per_block:
        raise ValueError(f"tile configuration {config.name} needs {config.smem_bytes} bytes of shared memory per "
                         f"block; {info.name} has {info.max_smem_per_block}")
    built = build(cuda_rtc.device_arch(torch.device("cuda", device_index)), dtype, config, variant=variant)
    return cuda_rtc.LoadedKernel(built, config.smem_bytes, device_index)


def _pad_rank(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    return F.pad(t, (0, -t.shape[-1] % multiple))


def launch(x2: torch.Tensor, weight: torch.Tensor, bias, low_rank_in, low_rank_up, out: torch.Tensor,
           norm_comp: bool, variant: str = "kernel", config: TileConfig | None = None) -> torch.Tensor:
    """x2 (M, K), weight (N, K), bias (N,) or None, T (M, R16) and U (N, R16) or None, out (M, N).

    Runs on x2's device, in its primary context, on PyTorch's current stream of that device (not the
    current device's). ``config`` overrides the per-shape choice (the tuning and benchmark scripts time
    each one)."""
    m, k = x2.shape
    n = weight.shape[0]
    if m == 0 or n == 0:  # an empty Y: nothing to launch (a grid of 0 CTAs is CUDA_ERROR_INVALID_VALUE)
        return out
    device = x2.device
    if config is None:
        config, _ = choose_config(device.index, x2.dtype, m, n, k)
    kernel = _loaded(device.index, x2.dtype, variant, config)
    rank = 0 if low_rank_in is None else low_rank_in.shape[1]
    kernel.launch((config.ctas(m, n), 1, 1), (THREADS, 1, 1),
                  [x2, weight, bias, low_rank_in, low_rank_up, out, ctypes.c_int(m), ctypes.c_int(n),
                   ctypes.c_int(k), ctypes.c_int(rank), ctypes.c_int(int(norm_comp))],
                  stream=torch.cuda.current_stream(device).cuda_stream)
    return out


def sparse_matmul(x, other, bias=None, lr_down=None, lr_up=None, *, n: int, m: int, norm_comp: bool = True,
                  config: TileConfig | None = None):
    """Same contract as ``reference.sparse_matmul`` (without ``min_tokens``, decided by the op);
    ``config`` overrides the per-shape tile choice."""
    contract.check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n, m)
    if (n, m) != (2, 4) or x.dtype not in SUPPORTED_DTYPES or not x.is_cuda or other.dim() != 2:
        raise ValueError(f"the fused kernel runs 2:4 fp16/bf16 2-D GEMMs on CUDA, got {n}:{m} {x.dtype} on "
                         f"{x.device.type} with a {other.dim()}-D right operand")
    k, n_out = other.shape
    if k % BLOCK_K or n_out % 8:
        raise ValueError(f"the fused kernel needs K % {BLOCK_K} == 0 and N % 8 == 0, got K={k}, N={n_out}")
    x2 = x.reshape(-1, k).contiguous()
    weight = other.t().contiguous()  # a no-op for a linear layer's weight.t()
    low_rank_in = low_rank_up = None
    if lr_down is not None:
        low_rank_in = _pad_rank(x2 @ lr_down).contiguous()
        low_rank_up = _pad_rank(lr_up.t()).contiguous()
    out = x2.new_empty((x2.shape[0], n_out))  # M = 0: (..., 0, N), and launch() launches nothing
    launch(x2, weight, None if bias is None else bias.contiguous(), low_rank_in, low_rank_up, out, norm_comp,
           config=config)
    return out.reshape(*x.shape[:-1], n_out)
