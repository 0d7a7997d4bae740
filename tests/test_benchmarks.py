"""The benchmark script's plumbing (a CPU smoke run): table, JSON schema, correctness column, and the
reason a route cannot run. The numbers themselves are only meaningful on a GPU."""

import json

import pytest

import bench_linear


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


def test_bad_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="bench_linear: shape '64x64' is not MxKxN"):
        bench_linear.parse_shapes("64x64")
    with pytest.raises(SystemExit, match="bench_linear: unknown route 'fused'; routes: dense, naive_cslt"):
        bench_linear.main(["--device", "cpu", "--routes", "fused"])


@pytest.mark.slow
def test_bench_dit_cpu_smoke_run(tmp_path, capsys):
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
