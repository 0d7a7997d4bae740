"""examples/calibrate_and_compile.py runs end to end: plan saved, one compile for the whole loop."""

import subprocess
import sys

import pytest

from shared import ROOT, not_installed

EXAMPLE = ROOT / "examples" / "calibrate_and_compile.py"


@pytest.mark.slow
def test_calibrate_and_compile_example(tmp_path):
    pytest.importorskip("diffusers", reason=not_installed("diffusers"))  # the example's model
    result = subprocess.run([sys.executable, str(EXAMPLE), "--plan-dir", str(tmp_path / "plan"), "--steps", "3"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.json", "tensors.safetensors"]
    assert f"1 compile(s) for 3 steps; plan saved to {tmp_path / 'plan'}/" in result.stdout
    assert "norm+low-rank(r=16)+bias" in result.stdout
