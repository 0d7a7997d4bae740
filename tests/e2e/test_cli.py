import json
import subprocess
import sys

import pytest

from lynx_compile.cli import main


def test_options_lists_every_option_with_default(capsys):
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    for line in ("pattern", "'2:4'", "'1:2', '4:8', 'dense'", "min_tokens", "512", "dump_dir"):
        assert line in out


def test_show_prints_dump_report(tmp_path, capsys):
    node = {"name": "blocks.0.ff", "op": "addmm", "shape": [512, 64, 256], "dtype": "float32", "rewritten": False,
            "pattern": "dense", "kernel": "", "reason": "K=30 is not divisible by M=4"}
    (tmp_path / "report.json").write_text(json.dumps({"nodes": [node, {**node, "rewritten": True, "reason": ""}]}))
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 GEMMs, 1 rewritten, 1 dense\n")
    assert "blocks.0.ff" in out and "512x64x256" in out and "K=30 is not divisible by M=4" in out


def test_show_without_report_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no report.json at"):
        main(["show", str(tmp_path)])


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "lynx_compile", "options"], capture_output=True, text=True)
    assert result.returncode == 0 and "min_tokens" in result.stdout
