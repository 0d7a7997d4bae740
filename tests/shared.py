"""What several test modules share, defined once: the patterns and dtypes under test, the bit views and
special values of each dtype, the device the kernel tests run on and why Triton cannot run there, and
the skips of tests that need an optional package.

tests/ is on ``sys.path`` (``pythonpath`` in pyproject's ``[tool.pytest.ini_options]``), so a test module
in any folder below it does ``from shared import PATTERNS, DTYPES``. tests/conftest.py registers the
markers (``gpu``, ``triton``, ``slow``) and skips marked tests from the availability computed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lynx_compile.kernels import contract, triton_compress

ROOT = Path(__file__).resolve().parents[1]  # the repository: tests/ is one level below it


def run_compiler_script(script: str, payload):
    """Run ``script`` in a subprocess without Triton's interpreter, so that it compiles for real GPU
    targets, with ``payload`` as JSON in argv[1]; returns the JSON on its last line of output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])

# ---- what the ops accept (kernels/contract.py), in the order the options list them -----------------
PATTERNS = list(contract.SUPPORTED_PATTERNS)      # [(2, 4), (1, 2), (4, 8)]
DTYPES = list(contract.SUPPORTED_DTYPES)          # [float32, float16, bfloat16]
# The sparse tensor-core routes (the fused CUDA kernel, cuSPARSELt) take only these.
HALF_DTYPES = [torch.bfloat16, torch.float16]
# The lists in the ops' error messages.
VALID_PATTERNS = "valid patterns: " + ", ".join(contract.PATTERN_NAMES)
SUPPORTED_DTYPES = "supported dtypes: " + ", ".join(contract.DTYPES)

# ---- bits and special values of each dtype -----------------------------------------------------------
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# A NaN with a payload and the sign bit set: a kept NaN must come through with its exact bits, and is
# told apart from the poison NaN that the Triton launchers write with LYNX_TRITON_POISON=1.
NAN_BITS = {torch.float32: -0x3FFFFF, torch.float16: -0x1FF, torch.bfloat16: -0x3F}
HUGE = {torch.float32: 1e30, torch.float16: 3e4, torch.bfloat16: 1e30}     # squares overflow fp32 / fp16
TINY = {torch.float32: 1e-40, torch.float16: 1e-7, torch.bfloat16: 1e-40}  # subnormal


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (floating dtypes), so that NaN payloads and -0.0 compare exactly."""
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def param_id(value):
    """Test ids: ``2:4`` for a pattern, ``bfloat16`` for a dtype, pytest's own id for anything else."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return None


# ---- where the device tests run ------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()
# The kernel tests run on the GPU where there is one, else on the CPU (Triton's interpreter: conftest.py
# sets TRITON_INTERPRET=1 before anything imports triton on a machine without an NVIDIA GPU).
DEVICE = "cuda" if HAS_CUDA else "cpu"


def triton_reason(device: str = DEVICE) -> str:
    """Why the Triton kernels cannot run on ``device`` here ("" when they can)."""
    return triton_compress.triton_unavailable_reason(device)


# ---- optional packages (pyproject's [project.optional-dependencies]) ---------------------------------
def not_installed(package: str, extra: str = "test", via: str = "") -> str:
    """The skip reason of a test that needs an optional package: ``pytest.importorskip(..., reason=...)``."""
    return f"{package} is not installed (optional dependency{via}: pip install -e '.[{extra}]')"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[module] = None
        return False


def requires(module: str, extra: str = "test", via: str = ""):
    """Skips a test that needs an optional package it does not import itself (a subprocess, or code
    under test that behaves differently without it); the others use ``pytest.importorskip``."""
    return pytest.mark.skipif(not installed(module), reason=not_installed(module, extra, via))


# ---- hypothesis (a test dependency) for the property tests -------------------------------------------
# The property tests share their modules with many plain tests, so a module-level importorskip would
# skip those too. Without hypothesis, ``given`` marks each property test skipped, with the reason, and
# ``st`` and ``settings`` stand in at import time (the strategies they build are never drawn from).
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HYPOTHESIS_REASON = ""
except ImportError:
    HYPOTHESIS_REASON = not_installed("hypothesis")

    class _Absent:
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    st = _Absent()

    def settings(*args, **kwargs):
        return lambda test: test

    def given(*args, **kwargs):
        return pytest.mark.skip(reason=HYPOTHESIS_REASON)
