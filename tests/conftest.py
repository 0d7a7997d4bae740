import glob
import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET once, when first imported (torch._dynamo imports it), so the CPU
# interpreter is chosen here, before torch, and only where no NVIDIA GPU could use real kernels.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import lynx_compile


@pytest.fixture(autouse=True)
def fresh_compile_state(tmp_path, monkeypatch):
    """Each test compiles from scratch: Inductor's caches skip custom passes on a hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
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


def pytest_configure(config):
    """benchmarks/ scripts are importable by the tests that smoke-test them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
