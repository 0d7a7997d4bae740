"""The example scripts run as a user runs them: in a fresh process, from the shell."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared import ROOT, not_installed

pytest.importorskip("diffusers", reason=not_installed("diffusers"))

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"


def test_diffusers_pipeline_example(tmp_path):
    dump = tmp_path / "lynx_dump"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "diffusers_pipeline.py"), "--steps", "2", "--dump-dir", str(dump)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 2 DiT blocks: 6 block linears each are rewritten (M = 2 labels x 2 for guidance x 256 patches),
    # and so is proj_out_2; the timestep/AdaLN linears (M = 4) stay dense under min_tokens=512.
    assert lines[0] == "rtlynx graph 0: 22 GEMMs, 13 rewritten to 2:4 sparse ops, 9 dense"
    assert "compiled graphs: 1 for 2 denoising steps" in lines
    assert "images: (2, 3, 32, 32), finite: True" in lines
    (rel,) = [float(m.group(1)) for line in lines
              if (m := re.fullmatch(r"relative L2 difference to the dense pipeline \(random weights\): (\S+)", line))]
    assert 0.01 < rel < 1.0  # sparse, and still close to the dense images

    report = json.loads((dump / "report.json").read_text())
    rewritten = {node["name"] for node in report["nodes"] if node["rewritten"]}
    assert rewritten == {f"transformer_blocks.{b}.{layer}" for b in (0, 1) for layer in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")} | {"proj_out_2"}
    assert {node["reason"] for node in report["nodes"] if not node["rewritten"]} == {"M=4 tokens < min_tokens=512"}
