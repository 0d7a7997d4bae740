"""``python -m lynx_compile demo`` and ``benchmarks/quality.py`` in their reduced modes, end to end."""

import json

import numpy as np
import pytest

from lynx_compile import cli
from shared import not_installed

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_writes_a_valid_png(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image", reason=not_installed("Pillow", via=" via matplotlib"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--images", "4", "--steps", "3", "--compensation", "full", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    # the 24 attention/MLP linears are rewritten with the calibrated plan; the rest are reported dense
    assert summary["gemms"]["gemms"] == 34 and summary["gemms"]["rewritten"] == 24
    assert "blocks.5.mlp.fc2" in printed and "norm+low-rank(r=16)+bias" in printed
    assert "plan keeps it dense: module path not matched by include" in printed
    metrics = summary["metrics"]
    assert 0 < metrics["relative_l2"] < 0.5 and metrics["psnr_db"] > 15 and 0 < metrics["ssim"] < 1
    assert summary["plan"]["sparse_layers"] == 24 and summary["plan"]["auto_dense_layers"] == []
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert plan["options"]["permutation"] is True and plan["options"]["rank"] == 16
    assert "CPU times do not show the GPU speed-up" in printed
    png = np.array(image_module.open(out / "demo.png"))
    # three 1x4 grids of 28x28 images (2-pixel padding) side by side with 8-pixel gaps
    assert png.dtype == np.uint8 and png.shape == (32, 3 * (4 * 30 + 2) + 2 * 8)


@pytest.mark.parametrize("argv, message", [
    (["--pattern", "3:4"], "lynx-compile demo: pattern '3:4' is not supported by the demo; valid choices: '2:4', '1:2', '4:8'"),
    (["--images", "0"], "lynx-compile demo: images and steps must be >= 1, got 0 and 20"),
    (["--device", "tpu"], "lynx-compile demo: device 'tpu' is not supported by the demo; valid choices: 'auto', 'cpu', 'cuda'"),
])
def test_demo_rejects_bad_flags_with_the_choices(tmp_path, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--out", str(tmp_path), "--no-progress", *argv])
    assert str(info.value) == message


def test_demo_rejects_an_unknown_compensation(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--compensation", "magic"])
    err = capsys.readouterr().err  # argparse quotes the choices in some Python versions and not in others
    assert "argument --compensation: invalid choice: 'magic' (choose from " in err
    assert all(choice in err.split("choose from")[1] for choice in ("none", "norm", "lowrank", "full", "auto"))


def test_quality_benchmark_quick_mode(tmp_path):
    import quality

    assert quality.main(["--quick", "--out", str(tmp_path), "--tag", "q"]) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    rows = {r["technique"]: r for r in data["rows"]}
    assert list(rows) == list(quality.QUICK_ROWS)
    assert rows["dense"]["rel_l2"] == 0 and rows["dense"]["psnr_db"] is None
    for name in quality.QUICK_ROWS[1:]:
        assert rows[name]["rel_l2"] > 0 and rows[name]["layer_err"] > 0 and len(rows[name]["layer_errors"]) == 24
    # what compensation is for: each step lowers the per-layer error, and the full chain the sample error
    naive, norm, full = (rows[n] for n in ("activations 2:4, naive", "+ norm compensation", "+ bias correction"))
    assert naive["layer_err"] > norm["layer_err"] > full["layer_err"]
    assert full["rel_l2"] < naive["rel_l2"]
    assert "| technique" in (tmp_path / "q.md").read_text()
