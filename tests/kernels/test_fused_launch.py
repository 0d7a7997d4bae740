"""The fused kernel's launch path (kernels/fused_cuda.py, kernels/cuda_rtc.py) on a machine with no GPU.

The CUDA driver is replaced by ``FakeDriver``: the same entry points, as ctypes function objects (so
that the arguments convert exactly as they do for libcuda), over a small model of what matters here:
devices and their primary contexts, the thread's current context, which context a module was loaded
into, and launches (grid, stream, and the kernel's scalar arguments read back through
``kernelParams``). PyTorch's side (current device, current streams) is faked to match. Tensors are CPU
tensors that say they live on ``cuda:1`` while the current device is ``cuda:0``: the case where
"current" and "x's device" differ.
"""

from __future__ import annotations

import ctypes
import types

import pytest
import torch

from lynx_compile.kernels import cuda_rtc, fused_cuda, fused_tiles

CUDA_SUCCESS, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_INVALID_HANDLE = 0, 1, 400
X_DEVICE = 1          # the device the tensors are on
CURRENT_DEVICE = 0    # the thread's current device
CONFIG = next(c for c in fused_cuda.TILE_CONFIGS if c.mainloop == "mma")
c_void_pp = ctypes.POINTER(ctypes.c_void_p)


def context_of(device: int) -> int:
    return 0x1000 + 0x100 * device


def stream_of(device: int) -> int:
    return 0x7000 + 0x10 * device


class FakeDriver:
    """libcuda for the launch path. ``calls``: (entry point, current context at the call, arguments)."""

    def __init__(self, version: int = 12090, devices: int = 2):
        self.version, self.devices = version, devices
        self.calls: list[tuple[str, int | None, tuple]] = []
        self.stack = [context_of(CURRENT_DEVICE)]  # the thread's contexts; PyTorch made cuda:0's current
        self.retained: list[int] = []
        self.modules: dict[int, int] = {}          # module -> the context it was loaded into
        self.functions: dict[int, int] = {}        # function -> its module
        self.launches: list[dict] = []
        i, u, p, s = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p
        entry_points = {
            "cuDriverGetVersion": (self._driver_version, ctypes.POINTER(i)),
            "cuInit": (self._init, u),
            "cuDeviceGet": (self._device_get, ctypes.POINTER(i), i),
            "cuDevicePrimaryCtxRetain": (self._retain, c_void_pp, i),
            "cuCtxGetCurrent": (self._get_current, c_void_pp),
            "cuCtxPushCurrent_v2": (self._push, p),
            "cuCtxPopCurrent_v2": (self._pop, c_void_pp),
            "cuModuleLoadData": (self._load, c_void_pp, s),
            "cuModuleGetFunction": (self._get_function, c_void_pp, p, s),
            "cuFuncSetAttribute": (self._set_attribute, p, i, i),
            "cuLaunchKernel": (self._launch, p, u, u, u, u, u, u, u, p, c_void_pp, c_void_pp),
            "cuGetErrorString": (self._error_string, i, ctypes.POINTER(s)),
        }
        for name, (impl, *argtypes) in entry_points.items():
            setattr(self, name, ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(self._recorded(name, impl)))

    @property
    def current(self) -> int | None:
        return self.stack[-1] if self.stack else None

    def device_of_current(self) -> int:
        return (self.current - 0x1000) // 0x100

    def _recorded(self, name, impl):
        def call(*args):
            self.calls.append((name, self.current, args))
            return impl(*args)
        return call

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    # ---- the entry points ----
    def _driver_version(self, out):
        out[0] = self.version
        return CUDA_SUCCESS

    def _init(self, flags):
        return CUDA_SUCCESS

    def _device_get(self, out, ordinal):
        if not 0 <= ordinal < self.devices:
            return CUDA_ERROR_INVALID_VALUE
        out[0] = ordinal
        return CUDA_SUCCESS

    def _retain(self, out, device):
        self.retained.append(device)
        out[0] = context_of(device)
        return CUDA_SUCCESS

    def _get_current(self, out):
        out[0] = self.current
        return CUDA_SUCCESS

    def _push(self, context):
        self.stack.append(context)
        return CUDA_SUCCESS

    def _pop(self, out):
        out[0] = self.stack.pop()
        return CUDA_SUCCESS

    def _load(self, out, image):
        module = 0x5000 + len(self.modules)
        self.modules[module] = self.current
        out[0] = module
        return CUDA_SUCCESS

    def _get_function(self, out, module, name):
        if self.modules.get(module) != self.current:
            return CUDA_ERROR_INVALID_HANDLE
        function = 0x6000 + len(self.functions)
        self.functions[function] = module
        out[0] = function
        return CUDA_SUCCESS

    def _set_attribute(self, function, attribute, value):
        return CUDA_SUCCESS

    def _launch(self, function, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        if 0 in (gx, gy, gz, bx, by, bz):
            return CUDA_ERROR_INVALID_VALUE  # what the driver says to an empty grid
        # The kernel's scalars (M, N, K, R, norm_comp) follow its 6 pointers.
        scalars = [ctypes.cast(params[6 + i], ctypes.POINTER(ctypes.c_int))[0] for i in range(5)]
        self.launches.append({"context": self.current, "module context": self.modules[self.functions[function]],
                              "grid": (gx, gy, gz), "block": (bx, by, bz), "smem": smem, "stream": stream or 0,
                              "m, n, k": tuple(scalars[:3])})
        return CUDA_SUCCESS

    def _error_string(self, status, out):
        out[0] = b"fake driver error"
        return CUDA_SUCCESS


class OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on cuda:X_DEVICE (the launch path reads device, is_cuda, shape,
    dtype and data_ptr)."""

    @property
    def device(self):
        return torch.device("cuda", X_DEVICE)

    @property
    def is_cuda(self):
        return True


def on_device(*shape) -> OnDevice:
    return torch.zeros(*shape, dtype=torch.bfloat16).as_subclass(OnDevice)


@pytest.fixture
def driver(monkeypatch):
    """The fake driver, and PyTorch's current device and streams as they would be with it."""
    fake = FakeDriver()
    monkeypatch.setattr(cuda_rtc, "_libcuda", lambda: fake)

    def device_index(device) -> int:
        if device is None:
            return fake.device_of_current()
        return device if isinstance(device, int) else torch.device(device).index

    def current_stream(device=None):
        index = device_index(device)
        return types.SimpleNamespace(cuda_stream=stream_of(index), device=torch.device("cuda", index))

    class device_guard:  # torch.cuda.device: cudaSetDevice, which makes that device's primary context current
        def __init__(self, device):
            self.index = device_index(device)

        def __enter__(self):
            self.previous = fake.stack[-1]
            fake.stack[-1] = context_of(self.index)

        def __exit__(self, *exc):
            fake.stack[-1] = self.previous

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", fake.device_of_current)
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(cuda_rtc, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(fused_cuda, "device_info",
                        lambda index: fused_tiles.DeviceInfo("Fake H100", 132, 232448, 233472, (9, 0)))
    monkeypatch.setattr(fused_cuda, "build", lambda arch, dtype, config, use_cache=True, variant="kernel":
                        cuda_rtc.Build(fused_cuda.KERNEL_NAME, arch, b"\x7fELF fake cubin", ""))
    caches = [fused_cuda._loaded] + [getattr(cuda_rtc, name) for name in ("primary_context",) if hasattr(cuda_rtc, name)]
    for cache in caches:
        cache.cache_clear()
    yield fake
    for cache in caches:
        cache.cache_clear()


def launch(m: int, n: int = 64, k: int = 128):
    x2, weight, out = on_device(m, k), on_device(n, k), on_device(m, n)
    return fused_cuda.launch(x2, weight, None, None, None, out, True, config=CONFIG), out


def test_launches_on_the_stream_of_x_device_in_its_primary_context(driver):
    launch(300)
    (record,) = driver.launches
    assert record["stream"] == stream_of(X_DEVICE), "launched on the current device's stream, not x's"
    assert X_DEVICE in driver.retained, "the primary context of x's device was not retained"
    assert record["context"] == record["module context"] == context_of(X_DEVICE)
    assert record["grid"] == (CONFIG.ctas(300, 64), 1, 1) and record["block"] == (fused_cuda.THREADS, 1, 1)
    assert (record["smem"], record["m, n, k"]) == (CONFIG.smem_bytes, (300, 64, 128))
    # The caller's current context (and so its current device) is as it was.
    assert driver.stack == [context_of(CURRENT_DEVICE)]


def test_the_module_is_loaded_and_launched_with_the_primary_context_pushed(driver):
    launch(300)
    launch(5)
    names = driver.names()
    assert names.count("cuDevicePrimaryCtxRetain") == 1  # once per device and process
    for entry in ("cuModuleLoadData", "cuModuleGetFunction", "cuFuncSetAttribute", "cuLaunchKernel"):
        assert all(context == context_of(X_DEVICE) for name, context, _ in driver.calls if name == entry), entry
    assert names.count("cuCtxPushCurrent_v2") == names.count("cuCtxPopCurrent_v2") == 3  # load, 2 launches
    assert len(driver.launches) == 2 and len(driver.modules) == 1


def test_no_push_when_the_primary_context_is_already_current(driver):
    driver.stack[-1] = context_of(X_DEVICE)
    launch(300)
    assert "cuCtxPushCurrent_v2" not in driver.names() and len(driver.launches) == 1


def test_an_empty_m_launches_nothing(driver):
    returned, out = launch(0)
    assert returned is out and tuple(out.shape) == (0, 64)
    assert "cuLaunchKernel" not in driver.names() and not driver.modules


def test_an_empty_m_gives_an_empty_result_of_the_right_shape(driver):
    x = on_device(2, 0, 128)
    weight = on_device(64, 128)
    y = fused_cuda.sparse_matmul(x, weight.t(), n=2, m=4, config=CONFIG)
    assert tuple(y.shape) == (2, 0, 64) and y.dtype == torch.bfloat16
    assert "cuLaunchKernel" not in driver.names()


def test_launch_errors_name_the_driver_call(driver):
    driver.stack[-1] = context_of(X_DEVICE)
    kernel = cuda_rtc.LoadedKernel(cuda_rtc.Build("k", "sm_90", b"", ""), 0, X_DEVICE)
    with pytest.raises(RuntimeError, match=r"CUDA driver error 1 in cuLaunchKernel\(k\): fake driver error"):
        kernel.launch((0, 1, 1), (32, 1, 1), [None] * 6 + [ctypes.c_int(0)] * 5)


# ---- which NVRTC ----------------------------------------------------------------------------------

@pytest.fixture
def fresh_nvrtc():
    cuda_rtc.nvrtc.cache_clear()
    yield
    cuda_rtc.nvrtc.cache_clear()  # the next user loads the real one again


def loaded_nvrtc(monkeypatch, available) -> tuple[str, list[str]]:
    """(the library nvrtc() returns, the names it tried) when only ``available`` can be opened."""
    tried = []

    def cdll(name, *args, **kwargs):
        tried.append(name)
        if name not in available:
            raise OSError(f"{name}: cannot open shared object file")
        return types.SimpleNamespace(name=name, nvrtcGetErrorString=types.SimpleNamespace())

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    return cuda_rtc.nvrtc().name, tried


def test_a_cuda_12_driver_gets_nvrtc_12_first(monkeypatch, fresh_nvrtc):
    monkeypatch.setattr(cuda_rtc, "_libcuda", lambda: FakeDriver(version=12090))
    monkeypatch.setattr(torch.version, "cuda", None)
    name, tried = loaded_nvrtc(monkeypatch, {"libnvrtc.so.12", "libnvrtc.so.13"})
    assert name == "libnvrtc.so.12" and tried == ["libnvrtc.so.12"]
    # and NVRTC 13 only when no 12 can be found
    cuda_rtc.nvrtc.cache_clear()
    name, tried = loaded_nvrtc(monkeypatch, {"libnvrtc.so.13"})
    assert name == "libnvrtc.so.13" and tried.index("libnvrtc.so.12") < tried.index("libnvrtc.so.13")
    paths = cuda_rtc._candidate_paths()
    majors = [p.rsplit(".so.", 1)[1].split(".")[0] for p in paths if ".so." in p]
    assert majors[:majors.index("13")] and set(majors[:majors.index("13")]) == {"12"}, paths


def test_without_a_driver_torch_cuda_version_decides(monkeypatch, fresh_nvrtc):
    def no_driver():
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(cuda_rtc, "_libcuda", no_driver)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert loaded_nvrtc(monkeypatch, {"libnvrtc.so.12", "libnvrtc.so.13"})[0] == "libnvrtc.so.12"
    cuda_rtc.nvrtc.cache_clear()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert loaded_nvrtc(monkeypatch, {"libnvrtc.so.12", "libnvrtc.so.13"})[0] == "libnvrtc.so.13"
    cuda_rtc.nvrtc.cache_clear()
    monkeypatch.setattr(torch.version, "cuda", None)  # nothing known: the newest first, as before
    assert loaded_nvrtc(monkeypatch, {"libnvrtc.so.12", "libnvrtc.so.13"})[0] == "libnvrtc.so.13"


def test_a_cuda_13_driver_gets_nvrtc_13_first(monkeypatch, fresh_nvrtc):
    monkeypatch.setattr(cuda_rtc, "_libcuda", lambda: FakeDriver(version=13000))
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # the driver, which loads the cubin, decides
    assert loaded_nvrtc(monkeypatch, {"libnvrtc.so.12", "libnvrtc.so.13"})[0] == "libnvrtc.so.13"
