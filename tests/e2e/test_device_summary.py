"""benchmarks/device_run.sh: its steps select the GPU tests, and its last table reads what they wrote."""

import json
import subprocess
import sys

from shared import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import device_summary  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.kernels.test_fused_cuda" name="test_a"/>
<testcase classname="tests.kernels.test_fused_cuda" name="test_b"><failure message="boom"/></testcase>
<testcase classname="tests.kernels.test_triton_op" name="test_c"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def test_summary_table_and_tests_json(tmp_path, capsys):
    (tmp_path / "tests.xml").write_text(JUNIT)
    linear = {"results": [{"shape": [8192, 3072, 3072], "low_rank": 0, "routes": {
        "dense": {"ms": 1.0}, "lynx_cusparselt": {"ms": 0.8}, "lynx_fused": {"ms": None, "error": "RuntimeError: x"}}}]}
    (tmp_path / "bench_linear_cuda_2026-12-02.json").write_text(json.dumps(linear))
    dit = {"image_tokens": 4096, "text_tokens": 512, "inductor": {"forward_ms": 10.0},
           "rtlynx": {"forward_ms": 8.0, "speedup": 1.25, "rewritten": 3, "gemms": 40}}
    (tmp_path / "bench_dit_cuda_2026-12-02.json").write_text(json.dumps(dit))
    assert device_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 passed, 1 failed, 1 skipped" in out
    assert "8192x3072x3072 lynx_cusparselt" in out and "1.25x" in out and "RuntimeError: x" in out
    assert json.loads((tmp_path / "tests.json").read_text()) == {
        "tests": 3, "failed": 1, "skipped": 1, "passed": 1, "failures": ["tests.kernels.test_fused_cuda::test_b"]}


def test_device_script_parses_and_its_test_step_selects_the_gpu_tests():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_run.sh")]).returncode == 0
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-m", "gpu or triton", "tests/kernels"], capture_output=True, text=True, cwd=ROOT,
                               timeout=300)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert any("test_fused_cuda" in i for i in ids) and any("test_triton_kernels" in i for i in ids), collected.stdout[-2000:]
