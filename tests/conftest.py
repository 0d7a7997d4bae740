"""The one conftest: the markers (``gpu``, ``triton``, ``slow``), the skips they bring, and the fixtures
every test shares. The constants that several test modules use live in tests/shared.py."""

import glob
import os

# Triton reads TRITON_INTERPRET once, when first imported (torch._dynamo imports it), so the CPU
# interpreter is chosen here, before torch, and only where no NVIDIA GPU could use real kernels.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lynx_compile  # noqa: E402
from shared import DEVICE, HAS_CUDA, triton_reason  # noqa: E402

MARKERS = [
    "slow: end-to-end model tests (deselect with -m 'not slow')",
    "gpu(why): needs a CUDA device; skipped, saying why, where torch.cuda.is_available() is False",
    "triton(device=shared.DEVICE): needs the Triton kernels to run on that device (compiled on a GPU, the "
    "interpreter on the CPU); skipped with the reason they cannot",
]


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    for item in items:
        gpu = item.get_closest_marker("gpu")
        if gpu is not None and not HAS_CUDA:
            why = f": {gpu.args[0]}" if gpu.args else ""
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU{why} (torch.cuda.is_available() is False)"))
        triton = item.get_closest_marker("triton")
        if triton is not None:
            reason = triton_reason(triton.kwargs.get("device", DEVICE))
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"Triton kernels cannot run here: {reason}"))


@pytest.fixture(autouse=True)
def fresh_compile_state(tmp_path, monkeypatch):
    """Each test compiles from scratch: Inductor's caches skip custom passes on a hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    monkeypatch.setenv("LYNX_TIMING_CACHE", str(tmp_path / "timings.json"))  # never the user's measured times
    monkeypatch.delenv("LYNX_DUMP_DIR", raising=False)
    torch._dynamo.reset()
    lynx_compile.clear_reports()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def share_compiled_kernels_within_a_test():
    """fresh_compile_state gives each test a fresh cache folder and turns Inductor's caches off, so
    that no test is served another's compile. A test that uses this fixture turns them back on inside
    itself: its compiles are of different graphs (plain Inductor vs rtlynx, dense vs rewritten), so none
    can be served another's FX graph (a wrong hit would skip the passes and leave a report missing,
    which the tests check), but they share the C++ kernels they have in common, which roughly halves
    the test's time."""
    with torch._inductor.config.patch(force_disable_caches=False):
        yield
