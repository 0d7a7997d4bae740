"""The benchmark scripts' plumbing (CPU smoke runs): table, JSON schema, correctness column, the reason a
route cannot run, and tune_fused.py's dry run and installed table. The numbers themselves are only
meaningful on a GPU."""

import json

import pytest
import torch

import bench_linear
from shared import not_installed


def test_cpu_smoke_run_writes_json_and_table(tmp_path, capsys):
    assert bench_linear.main(["--device", "cpu", "--dtype", "float32", "--shapes", "32x64x16",
                              "--routes", "dense,reference,lynx_cusparselt", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_linear_cpu_*.json")
    report = json.loads(path.read_text())
    assert report["baseline"] == "dense F.linear in the same run" and report["dtype"] == "float32"
    plain, low_rank = report["results"]
    assert (plain["shape"], plain["low_rank"], low_rank["low_rank"]) == ([32, 64, 16], 0, 64)
    assert plain["routes"]["dense"]["ms"] > 0 and plain["routes"]["reference"]["max_rel_error"] == 0
    assert plain["routes"]["lynx_cusparselt"] == {"ms": None, "error": "RuntimeError: needs a CUDA device, got 'cpu'"}
    assert "dense" not in low_rank["routes"]
    assert "32x64x16" in capsys.readouterr().out and list(tmp_path.glob("bench_linear_cpu_*.md"))


@pytest.mark.triton(device="cpu")
def test_compiled_triton_route_matches_the_reference(tmp_path):
    """The route that times the inlined kernels on CUDA; on the CPU it runs the interpreter through the op."""
    assert bench_linear.main(["--device", "cpu", "--dtype", "float32", "--shapes", "32x64x16",
                              "--routes", "lynx_triton_compiled", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_linear_cpu_*.json")
    plain, low_rank = json.loads(path.read_text())["results"]
    assert plain["routes"]["lynx_triton_compiled"]["max_rel_error"] < 1e-6
    assert low_rank["routes"]["lynx_triton_compiled"] == {
        "ms": None, "error": "ValueError: a compiled layer takes its low-rank term from a calibration plan; "
                             "use --low-rank off"}


def test_bad_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="bench_linear: shape '64x64' is not MxKxN"):
        bench_linear.parse_shapes("64x64")
    with pytest.raises(SystemExit, match="bench_linear: unknown route 'fused'; routes: dense, naive_cslt"):
        bench_linear.main(["--device", "cpu", "--routes", "fused"])


@pytest.mark.slow
def test_bench_dit_cpu_smoke_run(tmp_path, capsys):
    pytest.importorskip("diffusers", reason=not_installed("diffusers"))  # the benchmark's Flux model
    import bench_dit

    assert bench_dit.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--iters", "2",
                           "--options", '{"min_tokens": 0}', "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_dit_cpu_*.json")
    result = json.loads(path.read_text())
    assert (result["image_tokens"], result["text_tokens"], result["batch"], result["cuda_graphs"]) == (64, 16, 2, False)
    lynx = result["rtlynx"]
    assert lynx["graphs"] == 1 and lynx["rewritten"] == lynx["gemms"] > 0
    assert 0 < lynx["rel_l2_vs_inductor"] < 10 and result["inductor"]["forward_ms"] > 0
    assert "GEMMs rewritten" in capsys.readouterr().out


# ---- tune_fused.py: the GPU run needs CUDA; the dry run, the errors and the installed table do not ----

def test_tune_fused_dry_run_prints_the_wave_model_choice(capsys):
    import tune_fused

    assert tune_fused.main(["--dry-run", "--shapes", "1024x1152x1152,8192x3072x3072,8192x3072x12288"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("NVIDIA H100 80GB HBM3: 132 SMs, 232448 B shared memory per block, 233472 B per SM; "
                        "the wave model's choice (unmeasured)")
    assert lines[1].split() == ["MxKxN", "config", "tiles", "waves"]
    # Compute capability 9.0: the wgmma configurations come first and win the model's ties.
    assert [line.split() for line in lines[3:]] == [["1024x1152x1152", "128x128x4-wgmma", "72", "1"],
                                                    ["8192x3072x3072", "128x256x4-wgmma", "768", "6"],
                                                    ["8192x3072x12288", "128x128x4-wgmma", "6144", "47"]]


def test_tune_fused_dry_run_for_another_device(capsys):
    import tune_fused

    assert tune_fused.main(["--dry-run", "--shapes", "1024x3072x3072", "--device-info",
                            "NVIDIA A100-SXM4-80GB,108,166912,167936,8.0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["1024x3072x3072", "128x128x3", "192", "2"]


def test_tune_fused_errors(monkeypatch):
    import tune_fused

    for bad in ("H100,132", "H100,132,232448,233472", "H100,132,232448,233472,9"):
        with pytest.raises(SystemExit, match=f"^tune_fused: --device-info '{bad}' is not NAME,SMS,SMEM_BLOCK,SMEM_SM,"
                                             "CAPABILITY, e.g. 'NVIDIA H100 80GB HBM3,132,232448,233472,9.0'$"):
            tune_fused.main(["--dry-run", "--device-info", bad])
    with pytest.raises(SystemExit, match="^tune_fused: shape '64x64' is not MxKxN$"):
        tune_fused.main(["--dry-run", "--shapes", "64x64"])
    with pytest.raises(SystemExit, match="^tune_fused: --device-info is only for --dry-run"):
        tune_fused.main(["--device-info", tune_fused.H100])
    monkeypatch.setattr(tune_fused.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^tune_fused: CUDA is not available; --dry-run prints the wave model's "
                                         "choices without a GPU$"):
        tune_fused.main([])


def test_tune_fused_installs_a_table_the_kernel_reads(tmp_path, monkeypatch):
    import tune_fused
    from lynx_compile.kernels import fused_cuda, fused_tiles

    monkeypatch.setenv("LYNX_COMPILE_CACHE", str(tmp_path))
    fused_tiles.clear_cache()

    def report(shape, configs, best):
        result = {"shape": list(shape), "configs": configs, "best": best, "heuristic": "128x128x3", "agree": False}
        return {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "date": "2026-11-24", "torch": "2.13.0",
                "results": [result]}

    path = tune_fused.install(report((1024, 1152, 1152), {"128x256x3": {"us": 20.004}, "128x128x3": {"us": 25.0}},
                                     "128x256x3"))
    assert path == tmp_path / "tuned" / "nvidia-h100-80gb-hbm3.json"
    h100 = fused_tiles.DeviceInfo("NVIDIA H100 80GB HBM3", 132, 232448, 233472)
    assert fused_tiles.choose(h100, torch.bfloat16, 1024, 1152, 1152, fused_cuda.TILE_CONFIGS) == (
        fused_cuda.TileConfig(128, 256, 3), f"tuned: {path} (M=1024 entry)")
    # A second run merges: it replaces the entries it measured and keeps the others.
    tune_fused.install(report((8192, 3072, 3072), {"128x128x2": {"us": 300.0}}, "128x128x2"))
    table = json.loads(path.read_text())
    assert table["entries"] == [
        {"dtype": "bfloat16", "m": 1024, "n": 1152, "k": 1152, "config": "128x256x3", "us": 20.0},
        {"dtype": "bfloat16", "m": 8192, "n": 3072, "k": 3072, "config": "128x128x2", "us": 300.0}]
    fused_tiles.clear_cache()


def test_tune_fused_table_shows_times_errors_and_agreement():
    import tune_fused

    result = {"shape": [1024, 1152, 1152], "best": "128x128x3", "heuristic": "128x128x3", "agree": True,
              "configs": {"128x256x3": {"us": None, "error": "wrong result: max abs error 3 > tolerance 0.1"},
                          "128x128x3": {"us": 12.34, "max_abs_error": 0.0}}}
    assert tune_fused.table_rows([result], ["128x256x3", "128x128x3", "128x128x2"]) == [
        ["1024x1152x1152", "wrong result", "12.3", "", "128x128x3", "128x128x3", "yes"]]
