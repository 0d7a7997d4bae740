"""The fused kernel's per-shape tile choice (kernels/fused_tiles.py): the wave model, the tuned tables,
and their errors. No GPU and no NVRTC build: a DeviceInfo stands in for the device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from lynx_compile.kernels import fused_cuda, fused_tiles
from lynx_compile.kernels.fused_cuda import TileConfig

# The model does not depend on the main loop: these tests use the mma.sp configurations, which every
# sm_80+ device has (the wgmma ones are checked at the end).
TILE_CONFIGS = fused_cuda.configs_for((8, 0))
H100 = fused_tiles.DeviceInfo("NVIDIA H100 80GB HBM3", 132, 232448, 233472, (9, 0))
BF16 = torch.bfloat16
SHIPPED_DIR = fused_tiles.SHIPPED_DIR  # the fixture below points the module at an empty folder


def choose(device, m, n, k=3072, dtype=BF16):
    config, reason = fused_tiles.choose(device, dtype, m, n, k, TILE_CONFIGS)
    return config.name, reason


@pytest.fixture(autouse=True)
def fresh_tables(tmp_path, monkeypatch):
    """An empty user cache and an empty shipped folder, and no tables or choices remembered."""
    monkeypatch.setenv("LYNX_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused_tiles, "SHIPPED_DIR", tmp_path / "shipped")
    fused_tiles.clear_cache()
    yield
    fused_tiles.clear_cache()


def write_table(folder, entries, device=H100.name, **fields):
    path = folder / f"{fused_tiles.device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"device": device, "date": "2026-11-24", "torch": "2.13.0", "entries": entries} | fields
    path.write_text(json.dumps(table))
    fused_tiles.clear_cache()
    return path


def entry(m, n=3072, k=3072, config="128x128x2", dtype="bfloat16"):
    return {"dtype": dtype, "m": m, "n": n, "k": k, "config": config, "us": 100.0}


# ---- the inputs -----------------------------------------------------------------------------------

def test_tile_configs_and_their_shared_memory():
    assert [(c.name, c.smem_bytes) for c in TILE_CONFIGS] == [("128x256x3", 186880), ("128x128x3", 131584),
                                                             ("128x128x2", 94720)]


@pytest.mark.parametrize("smem,names", [(227 * 1024, ["128x256x3", "128x128x3", "128x128x2"]),   # H100
                                        (163 * 1024, ["128x128x3", "128x128x2"]),                # A100
                                        (99 * 1024, ["128x128x2"]),                              # sm_86/89
                                        (48 * 1024, [])])
def test_configs_that_fit_a_device(smem, names):
    assert [c.name for c in fused_tiles.fitting(TILE_CONFIGS, smem)] == names


def test_device_info_from_torch_with_fallbacks(monkeypatch):
    full = SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, major=9, minor=0,
                           shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: full)
    assert fused_tiles.DeviceInfo.of(0) == H100
    old = SimpleNamespace(name="Old GPU", multi_processor_count=80)  # a torch that reports no shared memory
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: old)
    assert fused_tiles.DeviceInfo.of(0) == fused_tiles.DeviceInfo("Old GPU", 80, 49152, 49152)


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                       ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb"),
                                       (" NVIDIA GeForce RTX 4090 ", "nvidia-geforce-rtx-4090")])
def test_device_slug(name, slug):
    assert fused_tiles.device_slug(name) == slug


# ---- the wave model -------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,expected", [
    (1024, 1152, ("128x128x3", "heuristic: 1 wave of 128x128x3 on 132 SMs")),     # 40 CTAs of 128x256 on 132 SMs
    (8192, 3072, ("128x256x3", "heuristic: 6 waves of 128x256x3 on 132 SMs")),    # tie with 12 waves of 128x128
    (1024, 3072, ("128x256x3", "heuristic: 1 wave of 128x256x3 on 132 SMs")),     # tie with 2 waves of 128x128
    (1024, 4608, ("128x128x3", "heuristic: 3 waves of 128x128x3 on 132 SMs")),    # 2 waves of 128x256 cost 4
    (8192, 12288, ("128x128x3", "heuristic: 47 waves of 128x128x3 on 132 SMs")),  # 24 waves of 128x256 cost 48
    (16384, 12288, ("128x256x3", "heuristic: 47 waves of 128x256x3 on 132 SMs")),
])
def test_wave_model_choices_on_h100(m, n, expected):
    assert choose(H100, m, n) == expected


def test_wave_model_costs_behind_the_worked_examples():
    big, small, two_stage = TILE_CONFIGS
    costs = {c.name: fused_tiles.predict(H100, c, 8192, 3072) for c in TILE_CONFIGS}
    assert costs["128x256x3"] == fused_tiles.Prediction(ctas_per_sm=1, tiles=768, waves=6, cost=6 * 128 * 256)
    assert costs["128x128x3"] == fused_tiles.Prediction(ctas_per_sm=1, tiles=1536, waves=12, cost=12 * 128 * 128)
    assert costs["128x128x3"].cost == costs["128x256x3"].cost  # so the larger tile wins on the tie
    assert fused_tiles.predict(H100, big, 1024, 1152) == fused_tiles.Prediction(1, 40, 1, 128 * 256)
    assert fused_tiles.predict(H100, small, 1024, 1152) == fused_tiles.Prediction(1, 72, 1, 128 * 128)
    # Shared memory would hold two 128x128x2 CTAs per SM; 180 registers x 256 threads allow only one.
    assert fused_tiles.predict(H100, two_stage, 1024, 1152).ctas_per_sm == 1


@dataclass(frozen=True)
class SmallTile:
    """A configuration the kernel does not have, light enough for several CTAs per SM."""
    name: str = "64x64x2"
    bm: int = 64
    bn: int = 64
    smem_bytes: int = 40000
    registers_per_cta: int = 96 * 256

    def ctas(self, m, n):
        return -(-m // self.bm) * -(-n // self.bn)


def test_several_ctas_per_sm_are_in_the_cost_and_the_reason():
    # Shared memory allows 233472 // 41024 = 5 CTAs, registers 65536 // 24576 = 2.
    assert fused_tiles.predict(H100, SmallTile(), 1024, 1024) == fused_tiles.Prediction(2, 256, 1, 2 * 64 * 64)
    config, reason = fused_tiles.heuristic(H100, 1024, 1024, (SmallTile(), TILE_CONFIGS[0]))
    assert (config.name, reason) == ("64x64x2", "heuristic: 1 wave of 64x64x2 on 132 SMs x 2 CTAs")
    # Two CTAs of 116224 B would fit 233472 B, but not with the 1 KB the driver keeps for each.
    assert fused_tiles.predict(H100, SmallTile(smem_bytes=116224), 1024, 1024).ctas_per_sm == 1
    assert fused_tiles.predict(H100, SmallTile(smem_bytes=115712), 1024, 1024).ctas_per_sm == 2


def test_only_configs_that_fit_are_chosen():
    small_gpu = fused_tiles.DeviceInfo("Small GPU", 84, 100000, 102400)
    assert choose(small_gpu, 1024, 1152) == ("128x128x2", "heuristic: 1 wave of 128x128x2 on 84 SMs")
    assert choose(small_gpu, 16384, 3072) == ("128x128x2", "heuristic: 37 waves of 128x128x2 on 84 SMs")


def test_no_config_fits_is_a_clear_error():
    tiny = fused_tiles.DeviceInfo("Tiny GPU", 20, 49152, 65536)
    with pytest.raises(ValueError) as error:
        choose(tiny, 1024, 1152)
    assert str(error.value) == ("no tile configuration fits 49152 bytes of shared memory per block on Tiny GPU; "
                                "the smallest needs 94720")


# ---- the tuned tables -----------------------------------------------------------------------------

def user_dir(tmp_path):
    return tmp_path / "cache" / "tuned"


def test_table_paths_are_the_user_cache_then_the_package(tmp_path):
    assert fused_tiles.table_paths(H100.name) == (user_dir(tmp_path) / "nvidia-h100-80gb-hbm3.json",
                                                  tmp_path / "shipped" / "nvidia-h100-80gb-hbm3.json")


def test_tuned_entry_wins_over_the_model(tmp_path):
    path = write_table(user_dir(tmp_path), [entry(8192, config="128x128x2")])
    assert choose(H100, 8192, 3072) == ("128x128x2", f"tuned: {path} (M=8192 entry)")


@pytest.mark.parametrize("m,served_by", [(6000, 8192), (16384, 8192), (2048, 1024), (2896, 1024), (2897, 8192),
                                         (1, 1024)])
def test_nearest_m_in_log2_serves_other_sizes(tmp_path, m, served_by):
    path = write_table(user_dir(tmp_path), [entry(1024, config="128x128x3"), entry(8192, config="128x128x2")])
    config = {1024: "128x128x3", 8192: "128x128x2"}[served_by]
    assert choose(H100, m, 3072) == (config, f"tuned: {path} (M={served_by} entry)")


def test_equally_near_entries_go_to_the_larger_m(tmp_path):
    path = write_table(user_dir(tmp_path), [entry(1024, config="128x128x3"), entry(4096, config="128x128x2")])
    assert choose(H100, 2048, 3072) == ("128x128x2", f"tuned: {path} (M=4096 entry)")


@pytest.mark.parametrize("dtype,n,k", [(torch.float16, 3072, 3072), (BF16, 1152, 3072), (BF16, 3072, 1152)])
def test_other_dtype_or_shape_falls_back_to_the_model(tmp_path, dtype, n, k):
    write_table(user_dir(tmp_path), [entry(8192, config="128x128x2")])
    assert choose(H100, 8192, n, k, dtype)[1].startswith("heuristic: ")


def test_unknown_config_in_a_table_is_ignored(tmp_path):
    path = write_table(user_dir(tmp_path), [entry(8192, config="64x64x4")])
    assert choose(H100, 8192, 3072) == (
        "128x256x3", f"heuristic: 6 waves of 128x256x3 on 132 SMs; ignored {path} (M=8192 entry): 64x64x4 is not "
                     "a tile configuration (128x256x3, 128x128x3, 128x128x2)")


def test_config_that_does_not_fit_the_device_is_ignored(tmp_path):
    a100ish = fused_tiles.DeviceInfo(H100.name, 108, 140000, 167936)  # same name, so the same table
    path = write_table(user_dir(tmp_path), [entry(8192, config="128x256x3")])
    assert choose(a100ish, 8192, 3072) == (
        "128x128x3", f"heuristic: 15 waves of 128x128x3 on 108 SMs; ignored {path} (M=8192 entry): 128x256x3 needs "
                     "186880 bytes of shared memory, the device has 140000")


def test_user_cache_overrides_the_shipped_table(tmp_path):
    user = write_table(user_dir(tmp_path), [entry(8192, config="128x128x2")])
    shipped = write_table(tmp_path / "shipped", [entry(8192, config="128x128x3"), entry(8192, 1152, 1152, "128x128x2")])
    assert choose(H100, 8192, 3072) == ("128x128x2", f"tuned: {user} (M=8192 entry)")
    # The shipped table still serves the (N, K) that the user's table does not have.
    assert choose(H100, 8192, 1152, 1152) == ("128x128x2", f"tuned: {shipped} (M=8192 entry)")


def test_tables_are_read_once_until_the_cache_is_cleared(tmp_path):
    path = write_table(user_dir(tmp_path), [entry(8192, config="128x128x2")])
    assert choose(H100, 8192, 3072)[0] == "128x128x2"
    path.write_text(json.dumps({"device": H100.name, "date": "", "torch": "", "entries": []}))
    assert choose(H100, 8192, 3072)[0] == "128x128x2"
    fused_tiles.clear_cache()
    assert choose(H100, 8192, 3072)[0] == "128x256x3"


@pytest.mark.parametrize("text,problem", [
    ("{not json", " is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[]", ": expected an object with an 'entries' list"),
    ('{"device": "x", "entries": []}', " lacks 'date', 'torch'"),
    ('{"device": "x", "date": "", "torch": "", "entries": [{"dtype": "bfloat16", "m": 1, "n": 8}]}',
     ", entry 0 lacks 'k', 'config'"),
    ('{"device": "x", "date": "", "torch": "", "entries": [[]]}', ", entry 0: expected an object, got list"),
    ('{"device": "x", "date": "", "torch": "", "entries": [{"dtype": "fp8", "m": 1, "n": 8, "k": 64, '
     '"config": "128x128x2"}]}', ", entry 0: unknown dtype 'fp8'; dtypes: float16, bfloat16"),
    ('{"device": "x", "date": "", "torch": "", "entries": [{"dtype": "float16", "m": 0, "n": 8, "k": 64, '
     '"config": "128x128x2"}]}', ", entry 0: m=0 is not a positive integer"),
    ('{"device": "x", "date": "", "torch": "", "entries": [{"dtype": "float16", "m": 8, "n": 8, "k": "64", '
     '"config": "128x128x2"}]}', ", entry 0: k='64' is not a positive integer"),
    ('{"device": "x", "date": "", "torch": "", "entries": [{"dtype": "float16", "m": 8, "n": 8, "k": 64, '
     '"config": [128, 128, 2]}]}', ", entry 0: config=[128, 128, 2] is not a name like '128x256x3'"),
])
def test_malformed_table_is_an_error_naming_the_file(tmp_path, text, problem):
    path = user_dir(tmp_path) / "nvidia-h100-80gb-hbm3.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        choose(H100, 8192, 3072)
    assert str(error.value) == f"tuned tile table {path}{problem}"


def test_shipped_tables_are_well_formed():
    assert (SHIPPED_DIR / "README.md").is_file()
    for path in SHIPPED_DIR.glob("*.json"):
        assert fused_tiles.load_table(path), f"{path} has no entries"


# ---- wired into the kernel ------------------------------------------------------------------------

def test_kernel_choice_goes_through_the_tuned_table(tmp_path, monkeypatch):
    monkeypatch.setattr(fused_cuda, "device_info", lambda index: H100)
    assert fused_cuda.choose_config(0, BF16, 1024, 1152, 1152) == (
        TileConfig(128, 128, 4, "wgmma"), "heuristic: 1 wave of 128x128x4-wgmma on 132 SMs")
    path = write_table(user_dir(tmp_path), [entry(1024, 1152, 1152, "128x256x3")])
    assert fused_cuda.choose_config(0, BF16, 1024, 1152, 1152) == (TileConfig(128, 256, 3),
                                                                  f"tuned: {path} (M=1024 entry)")


# ---- the two main loops ---------------------------------------------------------------------------

def test_wgmma_configs_only_on_compute_capability_9_0():
    wgmma = ["128x256x4-wgmma", "128x128x4-wgmma", "128x256x4-wgmma-c2"]
    mma = ["128x256x3", "128x128x3", "128x128x2"]
    assert [c.name for c in fused_cuda.configs_for((9, 0))] == wgmma + mma  # wgmma first: it wins ties
    for capability in ((8, 0), (8, 9), (10, 0), (12, 0)):  # sm_90a code runs on 9.0 only
        assert [c.name for c in fused_cuda.configs_for(capability)] == mma
    assert [c.name for c in fused_cuda.device_configs(H100)] == wgmma + mma
    a100 = fused_tiles.DeviceInfo("NVIDIA A100-SXM4-80GB", 108, 166912, 167936, (8, 0))
    assert [c.name for c in fused_cuda.device_configs(a100)] == ["128x128x3", "128x128x2"]


def test_wgmma_config_shared_memory_and_target():
    big, small = (c for c in fused_cuda.TILE_CONFIGS if c.mainloop == "wgmma" and c.cluster == 1)
    # W rows are 128 bytes (no padding, swizzled), plus 1008 bytes to align the base to 1024.
    assert (big.smem_bytes, small.smem_bytes) == (226800, 161264)
    assert big.arch("sm_90") == "sm_90a" and TILE_CONFIGS[0].arch("sm_90") == "sm_90"
    with pytest.raises(ValueError, match="^tile configuration 128x256x4-wgmma needs sm_90 \\(wgmma.mma_async.sp\\), "
                                         "not sm_80$"):
        big.arch("sm_80")
    with pytest.raises(ValueError, match="^unknown fused main loop 'wmma'; main loops: mma, wgmma$"):
        TileConfig(128, 128, 3, "wmma")


def test_cluster_config_holds_half_the_x_rows_and_pairs_the_n_tiles():
    pair = TileConfig(128, 256, 4, "wgmma", 2)
    assert pair.name == "128x256x4-wgmma-c2" and pair.defines(BF16, True)["CLUSTER_SHARE"] == 1
    # 4 stages of 64 X rows instead of 128: 4 * 64 * 144 B less than the single-CTA build.
    assert pair.smem_bytes == TileConfig(128, 256, 4, "wgmma").smem_bytes - 4 * 64 * 144 == 189936
    # 9 N tiles of 256 (N=2304) become 5 pairs, 10 CTAs per row of tiles: the tenth has no columns.
    assert (pair.ctas(1024, 2304), TileConfig(128, 256, 4, "wgmma").ctas(1024, 2304)) == (80, 72)
    assert fused_tiles.predict(H100, pair, 1024, 2304).tiles == 80
    # It comes after the single-CTA wgmma configurations, so the model never prefers it.
    best, reason = fused_tiles.choose(H100, BF16, 8192, 3072, 3072, fused_cuda.configs_for((9, 0)))
    assert (best.name, reason) == ("128x256x4-wgmma", "heuristic: 6 waves of 128x256x4-wgmma on 132 SMs")
    for bad in ((4, "wgmma"), (2, "mma")):
        with pytest.raises(ValueError, match=f"^cluster={bad[0]}: the fused kernel runs clusters of 1, or of 2 "
                                             "with the wgmma main loop$"):
            TileConfig(128, 256, 3, bad[1], bad[0])


def test_a_config_that_fails_its_self_test_is_not_used(monkeypatch):
    monkeypatch.setattr(fused_cuda, "device_info", lambda index: H100)
    monkeypatch.setattr(fused_cuda, "_REJECTED", {})
    wgmma_wrong = lambda run: "self-test error 3 > tolerance 0.1" if run.keywords["config"].mainloop == "wgmma" else ""
    with pytest.warns(UserWarning) as warned:
        assert fused_cuda.self_test(torch.device("cuda", 0), BF16, wgmma_wrong) == ""
    assert [str(w.message) for w in warned] == [
        f"fused kernel: tile configuration {name} failed its self-test on cuda:0 (self-test error 3 > tolerance 0.1); "
        "the other configurations are used" for name in ("128x256x4-wgmma", "128x128x4-wgmma", "128x256x4-wgmma-c2")]
    assert [c.name for c in fused_cuda.usable_configs(0, BF16)] == ["128x256x3", "128x128x3", "128x128x2"]
    assert fused_cuda.choose_config(0, BF16, 1024, 1152, 1152)[0] == TileConfig(128, 128, 3)
    assert len(fused_cuda.usable_configs(0, torch.float16)) == 6  # per dtype
    # The kernel fails its self-test only when no configuration passes, and says why for each.
    assert fused_cuda.self_test(torch.device("cuda", 0), BF16, lambda run: "wrong") == (
        "128x256x4-wgmma: wrong; 128x128x4-wgmma: wrong; 128x256x4-wgmma-c2: wrong; 128x256x3: wrong; 128x128x3: wrong; "
        "128x128x2: wrong")
