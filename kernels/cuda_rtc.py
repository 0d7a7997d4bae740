"""Build CUDA C++ at run time with NVRTC and launch it through the CUDA driver API (ctypes).

Why NVRTC and not ``torch.utils.cpp_extension``: it needs no CUDA toolkit, host compiler or PyTorch
headers on the user's machine (CUDA builds of PyTorch already ship ``libnvrtc``), a build takes about a
second instead of a minute, and the very same build runs on a machine with no GPU, so CI checks that
every kernel source compiles for each target architecture without spilling registers.

Builds are cached on disk, keyed by the source, the options and the NVRTC version.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# NVRTC majors this module knows, newest first: the order when neither the driver nor torch says
# which CUDA major this machine runs.
_NVRTC_MAJORS = (13, 12)
_SONAME_MAJOR = re.compile(r"libnvrtc\.so\.(\d+)")


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library could be loaded: CUDA kernels cannot be built here."""


class CudaBuildError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries its log."""


def driver_cuda_major() -> int | None:
    """The CUDA major version of the installed driver (``cuDriverGetVersion``), None without one."""
    try:
        lib = _libcuda()
    except OSError:
        return None
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000


def preferred_nvrtc_major() -> int | None:
    """The NVRTC major to try first: the driver's CUDA major, else torch's (``torch.version.cuda``).

    A cubin from a newer NVRTC than the driver may not load (CUDA 13's NVRTC on a CUDA 12 driver), and
    the driver is what loads it; torch's CUDA major is the next best guess on a machine without one.
    """
    major = driver_cuda_major()
    if major is None and torch.version.cuda:
        major = int(torch.version.cuda.split(".")[0])
    return major


def _candidate_paths() -> list[str]:
    """Where NVRTC is looked for, in order: per major (the preferred one first, then the others, newest
    first), the soname and then the pip wheels' copies; then the unversioned soname and any other copy.
    """
    # pip wheels (nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvrtc for CUDA 13) put the library under
    # site-packages/nvidia/; the dynamic loader does not look there.
    found = []
    for root in sys.path:
        for pattern in ("nvidia/cuda_nvrtc/lib/libnvrtc.so.*", "nvidia/cu*/lib/libnvrtc.so.*"):
            found += sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p
                            and ".alt." not in p)
    preferred = preferred_nvrtc_major()
    majors = ([preferred] if preferred is not None else []) + [m for m in _NVRTC_MAJORS if m != preferred]

    def major_of(path: str) -> int | None:
        match = _SONAME_MAJOR.search(os.path.basename(path))
        return int(match.group(1)) if match else None

    ordered = []
    for major in majors:
        ordered += [f"libnvrtc.so.{major}"] + [p for p in found if major_of(p) == major]
    return ordered + ["libnvrtc.so"] + [p for p in found if p not in ordered]


@lru_cache(maxsize=1)
def nvrtc() -> ctypes.CDLL:
    errors = []
    candidates = _candidate_paths()
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise NvrtcUnavailable("no NVRTC library found (tried " + ", ".join(candidates) +
                           "); install a CUDA build of PyTorch or nvidia-cuda-nvrtc")


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


def nvrtc_unavailable_reason() -> str:
    try:
        nvrtc_version()
    except NvrtcUnavailable as exc:
        return str(exc)
    return ""


def _check(status: int) -> None:
    if status != 0:
        raise CudaBuildError(f"NVRTC error {status}: {nvrtc().nvrtcGetErrorString(status).decode()}")


@dataclass(frozen=True)
class Build:
    """One compiled kernel: the cubin for one architecture and NVRTC's log (ptxas statistics)."""

    name: str
    arch: str
    cubin: bytes
    log: str


def cache_root() -> Path:
    """``$LYNX_COMPILE_CACHE``, else ``~/.cache/lynx_compile``: builds and tuned tile tables live under it."""
    return Path(os.environ.get("LYNX_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lynx_compile"))


def cache_dir() -> Path:
    return cache_root() / "cuda"


def build(source: str, name: str, arch: str, defines: dict[str, int] | None = None,
          headers: dict[str, str] | None = None, use_cache: bool = True) -> Build:
    """Compile ``source`` (one ``extern "C"`` kernel called ``name``) for ``arch`` (e.g. ``"sm_90"``).

    ``headers`` maps the names that ``source`` includes to their text.
    """
    headers = headers or {}
    options = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device", "--ptxas-options=-v"]
    options += [f"-D{key}={value}" for key, value in sorted((defines or {}).items())]
    parts = [source, name, *options, *(f"{k}\0{v}" for k, v in sorted(headers.items())), repr(nvrtc_version())]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
    cubin_path, log_path = cache_dir() / f"{name}-{key}.cubin", cache_dir() / f"{name}-{key}.log"
    if use_cache and cubin_path.exists() and log_path.exists():
        return Build(name, arch, cubin_path.read_bytes(), log_path.read_text())

    lib = nvrtc()
    program = ctypes.c_void_p()
    names = sorted(headers)
    header_texts = (ctypes.c_char_p * len(names))(*[headers[h].encode() for h in names])
    header_names = (ctypes.c_char_p * len(names))(*[h.encode() for h in names])
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), len(names),
                                  header_texts, header_names))
    try:
        c_options = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(program, len(options), c_options)
        log_size = ctypes.c_size_t()
        _check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(log_size)))
        log_buffer = ctypes.create_string_buffer(log_size.value)
        _check(lib.nvrtcGetProgramLog(program, log_buffer))
        log = log_buffer.value.decode(errors="replace")
        if status != 0:
            raise CudaBuildError(f"building CUDA kernel {name} for {arch} failed:\n{log}")
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(program, cubin))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))
    result = Build(name, arch, cubin.raw, log)
    if use_cache:
        cache_dir().mkdir(parents=True, exist_ok=True)
        cubin_path.write_bytes(result.cubin)
        log_path.write_text(result.log)
    return result


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# ---- the driver side: load a cubin and launch it on a stream of its device -----------------------
#
# PyTorch runs each device in its primary context. A module belongs to the context it was loaded
# into and a stream to its device's context, so a kernel for device d is loaded and launched with d's
# primary context current (pushed, then popped: the caller's current context, which is also what
# torch.cuda.current_device() reports, stays as it was), whatever device is current on this thread.

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check_driver(status: int, what: str) -> None:
    if status != 0:
        text = ctypes.c_char_p()
        _libcuda().cuGetErrorString(status, ctypes.byref(text))
        raise RuntimeError(f"CUDA driver error {status} in {what}: {(text.value or b'?').decode()}")


@lru_cache(maxsize=None)
def primary_context(device_index: int) -> ctypes.c_void_p:
    """The primary context of CUDA device ``device_index`` (the one PyTorch uses), retained once per
    process and never released, as PyTorch does, so that the modules loaded into it stay valid."""
    lib = _libcuda()
    _check_driver(lib.cuInit(0), "cuInit")
    device = ctypes.c_int()
    _check_driver(lib.cuDeviceGet(ctypes.byref(device), device_index), f"cuDeviceGet({device_index})")
    context = ctypes.c_void_p()
    _check_driver(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device),
                  f"cuDevicePrimaryCtxRetain({device_index})")
    return context


@contextlib.contextmanager
def context_current(context: ctypes.c_void_p):
    """``context`` is the current CUDA context of this thread inside the block; the previous one after."""
    lib = _libcuda()
    current = ctypes.c_void_p()
    _check_driver(lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    if current.value == context.value:
        yield
        return
    _check_driver(lib.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
    try:
        yield
    finally:
        popped = ctypes.c_void_p()
        _check_driver(lib.cuCtxPopCurrent_v2(ctypes.byref(popped)), "cuCtxPopCurrent")


def kernel_arguments(args: list) -> tuple[list, ctypes.Array]:
    """``args`` (ctypes scalars, tensors as device pointers, None as a null pointer) as cuLaunchKernel's
    ``kernelParams``: the holders (to keep alive during the call) and the array of pointers to them."""
    holders = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
               else ctypes.c_void_p(0) if a is None else a for a in args]
    pointers = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
    return holders, pointers


class LoadedKernel:
    """A kernel function loaded into the primary context of one CUDA device, launched with explicitly
    typed arguments on a stream of that device."""

    def __init__(self, built: Build, dynamic_smem: int, device_index: int | None = None):
        self.name, self.dynamic_smem = built.name, dynamic_smem
        self.device_index = torch.cuda.current_device() if device_index is None else device_index
        self._context = primary_context(self.device_index)
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        lib = _libcuda()
        with context_current(self._context):
            _check_driver(lib.cuModuleLoadData(ctypes.byref(self._module), built.cubin), "cuModuleLoadData")
            _check_driver(lib.cuModuleGetFunction(ctypes.byref(self._function), self._module, built.name.encode()),
                          "cuModuleGetFunction")
            _check_driver(lib.cuFuncSetAttribute(self._function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 dynamic_smem), "cuFuncSetAttribute")

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list,
               stream: int | None = None) -> None:
        """``args``: see ``kernel_arguments``. ``stream``: a ``cudaStream_t`` of this kernel's device (0
        is its legacy default stream); None is PyTorch's current stream of that device."""
        if stream is None:
            stream = torch.cuda.current_stream(self.device_index).cuda_stream
        holders, pointers = kernel_arguments(args)  # pointers point into holders: both live until the return
        with context_current(self._context):
            _check_driver(_libcuda().cuLaunchKernel(self._function, *grid, *block, self.dynamic_smem,
                                                    ctypes.c_void_p(stream), pointers, None),
                          f"cuLaunchKernel({self.name})")
