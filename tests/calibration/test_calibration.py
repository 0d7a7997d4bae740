"""Calibration: statistics, compensation fits, automatic dense layers and plans on disk.

The test model (calibration_model.py) is a tiny DiT-style stack trained here to regress a fixed
nonlinear teacher, on structured, heavy-tailed tokens with clustered channel magnitudes.
"""

import json
import math
import re

import pytest
import torch
from torch import nn

from lynx_compile.calibration import (
    CalibrationConfig,
    balanced_permutation,
    calibrate,
    calibration_inputs_from_loop,
    measure_layer_errors,
    model_output_error,
    reduced_rank_regression,
    refine,
)
from lynx_compile.kernels import reference
from lynx_compile.plan import LayerPlan, Plan
from calibration_model import BASE, CHANNEL_SCALES, CIN, DEPTH, DIM, HIDDEN, RANK, TinyDiT, train_and_sample


@pytest.fixture(scope="module")
def setup():
    """(trained model, 8 calibration batches, 4 held-out batches)."""
    return train_and_sample()


@pytest.fixture(scope="module")
def plan_perm(setup):
    model, cal, _ = setup
    return calibrate(model, cal, {**BASE, "permutation": True}, progress=False)


SPARSE = ["proj_in", *(f"blocks.{i}.{fc}" for i in range(DEPTH) for fc in ("fc1", "fc2")), "proj_out"]


# ---- decisions and statistics -------------------------------------------------------------------
def test_decisions_and_reasons(plan_perm):
    plan = plan_perm
    assert plan.sparse_layers() == SPARSE
    for path in ["t_mlp.0", "t_mlp.2", "blocks.0.ada"]:
        assert plan.layers[path].reason == "M=8 tokens < min_tokens=16"
    assert plan.layers["blocks.0.fc1"].tokens == 8 * 8 * 64 and plan.layers["blocks.0.fc1"].max_rows == 8 * 64
    lp = plan.layers["blocks.0.fc1"]
    assert lp.lr_down.shape == (DIM, RANK) and lp.lr_up.shape == (RANK, HIDDEN) and lp.bias_delta.shape == (HIDDEN,)
    assert lp.lr_down.dtype == torch.float32 and lp.bias_delta.dtype == torch.float32


def test_other_dense_reasons():
    model = nn.Sequential(nn.Linear(30, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model.add_module("unused", nn.Identity())
    model.unused.never_called = nn.Linear(8, 8)
    x = torch.randn(4, 32, 30)
    plan = calibrate(model, [x], {"exclude": r"^2$", "rank": 2}, progress=False)
    assert plan.layers["0"].reason == "K=30 is not divisible by M=4"
    assert plan.layers["2"].reason == "module path matches exclude '^2$'"
    assert plan.layers["unused.never_called"].reason == "not called on the calibration inputs"
    assert plan.sparse_layers() == ["1"]
    plan = calibrate(nn.Sequential(nn.Linear(8, 8).double()), [x[..., :8].double()], progress=False)
    assert plan.layers["0"].reason == "dtype float64 unsupported (supported: float32, float16, bfloat16)"
    plan = calibrate(model, [x], {"include": r"^1$"}, progress=False)
    assert plan.layers["2"].reason == "module path not matched by include"
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    plan = calibrate(nn.Sequential(nn.Linear(28, 8)), [bad[..., :28]], progress=False)
    assert plan.layers["0"].reason == "non-finite (NaN/Inf) activations on the calibration inputs"


def test_statistics_errors_match_measured_errors(setup, plan_perm):
    """The errors derived from XᵀX-style statistics equal the errors of the eager reference op."""
    model, cal, _ = setup
    measured = measure_layer_errors(plan_perm, model, cal)
    for path in SPARSE:
        assert measured[path] == pytest.approx(plan_perm.layers[path].errors["final"], rel=1e-5)


def test_layers_per_pass_gives_the_same_plan(setup):
    model, cal, _ = setup
    one = calibrate(model, cal[:2], BASE, progress=False)
    grouped = calibrate(model, cal[:2], {**BASE, "layers_per_pass": 3}, progress=False)
    for path in SPARSE:
        assert torch.equal(one.layers[path].lr_down, grouped.layers[path].lr_down)
        assert one.layers[path].errors == grouped.layers[path].errors


# ---- each compensation method lowers the per-layer error -----------------------------------------
def test_each_compensation_lowers_layer_error(setup, plan_perm):
    model, cal, held = setup
    for path in SPARSE:
        e = plan_perm.layers[path].errors
        assert e["bias"] <= e["norm"] + 1e-12, path          # the mean of what is dropped, removed
        assert e["lowrank"] < 0.95 * e["bias"], path         # the low-rank branch predicts the rest
    for path in SPARSE:
        if path.endswith("fc1"):  # LayerNorm + modulation inputs: norm compensation clearly helps
            e = plan_perm.layers[path].errors
            assert e["norm"] < 0.95 * e["plain"], path
    # The same order holds on held-out data, measured with the eager reference op.
    stage_options = {"plain": {"norm_comp": False, "bias_correction": False, "low_rank": False},
                     "norm": {"bias_correction": False, "low_rank": False},
                     "bias": {"low_rank": False},
                     "lowrank": {}}
    held_err = {stage: measure_layer_errors(calibrate(model, cal, {**BASE, **opts}, progress=False), model, held)
                for stage, opts in stage_options.items()}
    for path in SPARSE:
        assert held_err["bias"][path] <= held_err["norm"][path] * 1.001, path
        assert held_err["lowrank"][path] < held_err["bias"][path], path
        if path.endswith("fc1"):
            assert held_err["norm"][path] < held_err["plain"][path], path


def test_permutation_balances_unbalanced_channels(setup, plan_perm):
    """proj_in sees clustered channel magnitudes: dealing them across groups keeps the large ones."""
    e = plan_perm.layers["proj_in"].errors
    assert e["plain_perm"] < 0.5 * e["plain"]
    assert e["perm"] < e["lowrank"] and e["final"] == e["perm"]
    assert plan_perm.layers["proj_in"].perm is not None
    for path in SPARSE:  # a permutation is only kept where it lowers the layer's error
        lp = plan_perm.layers[path]
        assert lp.errors["final"] == min(lp.errors["lowrank"], lp.errors["perm"])
        assert (lp.perm is not None) == (lp.errors["perm"] < lp.errors["lowrank"])


def test_balanced_permutation_deals_magnitude_bands():
    energy = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])  # sorted: groups of 4 would be all-large, all-small
    perm = balanced_permutation(energy, 4)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert sorted(perm.tolist()) == list(range(8)) and perm.dtype == torch.int64


# ---- the reduced-rank regression ----------------------------------------------------------------
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_rrr_matches_direct_least_squares(bias_correction, ridge):
    """The fit from streamed statistics equals a rank-R least-squares fit on the stored activations."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 12).requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(5, 16, generator=gen)
    batches = [nn.functional.gelu((torch.randn(50, 5, generator=gen) / torch.rand(50, 5, generator=gen)
                                   .clamp_min(0.05).sqrt()) @ mix) for _ in range(6)]
    rank = 3
    plan = calibrate(nn.Sequential(layer), batches,
                     {"rank": rank, "ridge": ridge, "bias_correction": bias_correction}, progress=False)
    lp = plan.layers["0"]

    x = torch.cat(batches).double()
    values, indices, scale = reference.compress(torch.cat(batches), 2, 4, True)
    d = x - scale.double()[:, None] * reference.decompress(values, indices, 2, 4).double()
    t = d @ layer.weight.double().T
    xc, tc = (x - x.mean(0), t - t.mean(0)) if bias_correction else (x, t)
    lam = ridge * float(xc.square().sum()) / 16
    x_aug = torch.cat([xc, math.sqrt(lam) * torch.eye(16, dtype=torch.float64)])
    t_aug = torch.cat([tc, torch.zeros(16, 12, dtype=torch.float64)])
    c_full = torch.linalg.lstsq(x_aug, t_aug).solution
    v = torch.linalg.svd(xc @ c_full, full_matrices=False).Vh[:rank].T
    c_direct = c_full @ v @ v.T
    c_plan = lp.lr_down.double() @ lp.lr_up.double()
    torch.testing.assert_close(c_plan, c_direct, rtol=1e-5, atol=1e-5 * float(c_direct.abs().max()))
    if bias_correction:
        delta = t.mean(0) - x.mean(0) @ c_plan
        torch.testing.assert_close(lp.bias_delta.double(), delta, rtol=1e-5, atol=1e-6)
    else:
        assert lp.bias_delta is None
    # and the error the plan reports is the error of the stored tensors on these activations
    resid = t - x @ c_plan - (lp.bias_delta.double() if bias_correction else 0)
    y = x @ layer.weight.double().T + layer.bias.double()
    assert lp.errors["lowrank"] == pytest.approx(float(resid.norm() / y.norm()), rel=1e-6)


def test_rrr_rank_is_capped_and_orthonormal():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=gen, dtype=torch.float64)
    t = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    a, b = reduced_rank_regression(x.T @ x, x.T @ t, 4, 0.0)
    assert a.shape == (8, 4) and b.shape == (6, 4)
    torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64))
    plan = calibrate(nn.Sequential(nn.Linear(8, 4)), [x.float()], {"rank": 64}, progress=False)
    assert plan.layers["0"].rank == 4 and plan.layers["0"].lr_down.shape == (8, 4)


# ---- automatic dense layers ---------------------------------------------------------------------
def test_error_budget_makes_the_worst_layers_dense(setup, plan_perm):
    model, cal, _ = setup
    all_sparse = plan_perm.output_error["all_sparse"]
    budget = 0.5 * all_sparse
    plan = calibrate(model, cal, {**BASE, "permutation": True, "error_budget": budget}, progress=False)
    out = plan.output_error
    assert out["all_sparse"] == pytest.approx(all_sparse)
    assert out["final"] <= budget
    assert model_output_error(plan, model, cal) == pytest.approx(out["final"], rel=1e-9)
    chosen = [p for p in SPARSE if not plan.layers[p].sparse]
    assert 0 < len(chosen) < len(SPARSE)
    ranked = sorted(SPARSE, key=lambda p: plan_perm.layers[p].errors["final"], reverse=True)
    assert set(chosen) == set(ranked[:len(chosen)])  # the largest per-layer errors, not hand-picked
    k = len(chosen)
    assert out["evaluations"][str(k - 1)] > budget  # one fewer dense layer misses the budget
    assert len(out["evaluations"]) <= 2 + math.ceil(math.log2(len(SPARSE)))  # bounded evaluations
    for rank, path in enumerate(ranked[:k], 1):
        lp = plan.layers[path]
        assert lp.auto_dense["rank"] == rank and lp.auto_dense["output_error_with_it_sparse"] > budget
        assert lp.reason.startswith(f"error budget {budget:g}: layer error ") and not lp.tensors()
    # a budget the all-sparse model meets keeps every layer sparse; budget 0 makes all dense
    assert calibrate(model, cal[:2], {**BASE, "error_budget": 10.0}, progress=False).sparse_layers() == SPARSE
    none = calibrate(model, cal[:2], {**BASE, "error_budget": 0.0}, progress=False)
    assert none.sparse_layers() == [] and none.output_error["final"] == 0.0


# ---- the callable (sampling loop) form ----------------------------------------------------------
def test_sampling_loop_calibration(setup):
    model, _, _ = setup

    def sample(model, batch):
        x = torch.randn(batch, 64, CIN) * CHANNEL_SCALES  # seeded per case by the helper
        for step in range(4):
            t = torch.full((batch,), 1 - step / 4)
            x = x - 0.25 * model(x, t)
        return x

    run = calibration_inputs_from_loop(sample, [4, 8], seed=5)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    first, second = run(model), run(model)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    plan = calibrate(model, run, {**BASE, "min_tokens": 256, "error_budget": 0.05}, progress=False)
    assert plan.layers["blocks.0.fc1"].tokens == 4 * (4 + 8) * 64  # every timestep of every case
    assert plan.output_error["final"] <= 0.05
    with pytest.raises(ValueError, match="option 'error_budget' needs the model output"):
        calibrate(model, lambda m: None, {"error_budget": 0.1}, progress=False)


def test_progress_bar_on_stderr(setup, capsys):
    model, cal, _ = setup
    calibrate(model, cal[:2], BASE, progress=True)
    err = capsys.readouterr().err
    assert "calibrate 1/2: statistics: [####################] 2/2 model calls" in err


# ---- plans on disk and in eager -----------------------------------------------------------------
def test_plan_round_trip_is_bit_identical(setup, plan_perm, tmp_path):
    model, cal, held = setup
    plan_perm.save(tmp_path / "plan")
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.json", "tensors.safetensors"]
    loaded = Plan.load(tmp_path / "plan")
    assert loaded.to_json() == plan_perm.to_json()
    for path, lp in plan_perm.layers.items():
        got = loaded.layers[path].tensors()
        assert got.keys() == lp.tensors().keys()
        assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype for k, t in lp.tensors().items())
    data = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert data["layers"]["proj_in"]["decision"] == "sparse" and "perm" in data["layers"]["proj_in"]["tensors"]
    (args, kwargs), = held[:1]
    with plan_perm.apply_eager(model):
        a = model(*args, **kwargs)
    with loaded.apply_eager(model):
        b = model(*args, **kwargs)
    assert torch.equal(a, b)
    dense = model(*args, **kwargs)
    assert not torch.equal(a, dense) and "forward" not in vars(model.proj_in)  # restored after the block


def test_apply_eager_matches_the_reference_op(setup, plan_perm):
    """The eager model is exactly rtlynx.sparse_matmul with the plan folded into W and b."""
    model, _, held = setup
    (x, t), _ = held[0]
    lp = plan_perm.layers["proj_in"]
    op = lp.op_inputs(model.proj_in.weight, model.proj_in.bias)
    want = reference.sparse_matmul(x.reshape(-1, CIN)[:, lp.perm], op.other, op.bias, op.lr_down, op.lr_up, n=2, m=4)
    with plan_perm.apply_eager(model):
        got = model.proj_in(x)
    assert torch.equal(got, want.reshape(8, 64, DIM))
    torch.testing.assert_close(op.other, model.proj_in.weight[:, lp.perm].t())
    torch.testing.assert_close(op.bias, model.proj_in.bias + lp.bias_delta)


def test_mismatched_plan_is_a_clear_error(setup, plan_perm, tmp_path):
    model, _, _ = setup
    plan = plan_perm.copy()
    plan.layers["blocks.0.fc_1"] = plan.layers.pop("blocks.0.fc1")
    plan.layers["blocks.0.fc_1"].path = "blocks.0.fc_1"
    with pytest.raises(ValueError, match=re.escape("plan layer 'blocks.0.fc_1' is not a module of the model; "
                                                   "did you mean 'blocks.0.fc1'?")):
        plan.validate(model)
    narrow = TinyDiT(hidden=128)
    with pytest.raises(ValueError, match=re.escape("plan layer 'blocks.0.fc1' has N=256 but the model's "
                                                   "layer has N=128")):
        plan_perm.validate(narrow)
    only_fc2 = Plan(layers={"blocks.0.fc2": plan_perm.layers["blocks.0.fc2"]})
    with pytest.raises(ValueError, match=re.escape("plan layer 'blocks.0.fc2' has K=256 but the model's layer "
                                                   "has K=128")):
        only_fc2.validate(narrow)
    with pytest.raises(ValueError, match=re.escape("plan layer 'blocks.0.norm' is a LayerNorm in the model, "
                                                   "not an nn.Linear")):
        Plan(layers={"blocks.0.norm": LayerPlan("blocks.0.norm", 64, 64, "float32", True)}).validate(model)
    with pytest.raises(ValueError, match=re.escape("is not a module of the model")):
        with plan.apply_eager(model):
            pass
    # on disk: a tensor the JSON names but the safetensors file lacks, and a shape mismatch
    plan_perm.save(tmp_path / "p")
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    data["layers"]["blocks.0.ada"]["tensors"] = ["lr_down"]
    (tmp_path / "p" / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape("plan layer 'blocks.0.ada': tensor 'blocks.0.ada.lr_down' is "
                                                   "missing from tensors.safetensors")):
        Plan.load(tmp_path / "p")
    data["layers"]["blocks.0.ada"]["tensors"] = []
    data["layers"]["blocks.0.fc1"]["in_features"] = 32
    (tmp_path / "p" / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape("plan layer 'blocks.0.fc1': lr_down must be (K=32, R) and lr_up "
                                                   "(R, N=256), got (64, 8) and (8, 256)")):
        Plan.load(tmp_path / "p")


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"patern": "2:4"}, "unknown option 'patern'; valid options: 'pattern', 'norm_comp', 'rank'"),
    ({"pattern": "dense"}, "option 'pattern' has invalid value 'dense'; valid choices: '2:4', '1:2', '4:8'"),
    ({"rank": 0}, "option 'rank' must be an integer >= 1, got 0"),
    ({"low_rank": 1}, "option 'low_rank' must be True or False, got 1"),
    ({"error_budget": -0.1}, "option 'error_budget' must be a finite number >= 0 or None, got -0.1"),
    ({"error_budget": "5%"}, "option 'error_budget' must be a finite number >= 0 or None, got '5%'"),
    ({"min_tokens": True}, "option 'min_tokens' must be an integer >= 0, got True"),
    ({"include": "blocks.(("}, "option 'include': invalid regex 'blocks.(('"),
    ({"layers_per_pass": 0}, "option 'layers_per_pass' must be an integer >= 1 or None, got 0"),
])
def test_bad_option_lists_choices(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CalibrationConfig.from_options(options)
    with pytest.raises(ValueError, match=re.escape(message)):
        calibrate(nn.Linear(4, 4), [torch.randn(4, 4)], options, progress=False)


def test_options_are_frozen_and_recorded(plan_perm):
    cfg = CalibrationConfig.from_options({"include": "blocks", "error_budget": 1})
    assert cfg.include == ("blocks",) and cfg.error_budget == 1.0 and hash(cfg)
    with pytest.raises(AttributeError):
        cfg.rank = 3
    assert plan_perm.options["permutation"] is True and plan_perm.options["rank"] == RANK


# ---- gradient refinement ------------------------------------------------------------------------
def test_refine_lowers_layer_error(setup):
    model, cal, _ = setup
    start = calibrate(model, cal, {**BASE, "low_rank": False}, progress=False)
    refined = refine(start, model, cal, steps=40, lr=1e-2, progress=False)
    for path in SPARSE:
        lp = refined.layers[path]
        assert lp.errors["refined"] < lp.errors["before_refine"], path
        assert lp.errors["before_refine"] == pytest.approx(start.layers[path].errors["final"], rel=1e-5)
        assert lp.lr_down.shape == (lp.in_features, RANK) and lp.rank == RANK
        assert torch.equal(lp.bias_delta, start.layers[path].bias_delta)  # only the low-rank branch trains
    measured = measure_layer_errors(refined, model, cal)
    assert all(measured[p] == pytest.approx(refined.layers[p].errors["refined"], rel=1e-6) for p in SPARSE)
    assert start.layers["proj_in"].lr_down is None  # the input plan is not modified


def test_refine_never_makes_a_layer_worse(setup, plan_perm):
    model, cal, _ = setup
    refined = refine(plan_perm, model, cal[:4], steps=8, lr=1e-1, progress=False)
    for path in SPARSE:
        e = refined.layers[path].errors
        kept_old = torch.equal(refined.layers[path].lr_down, plan_perm.layers[path].lr_down)
        assert kept_old == (e["refined"] >= e["before_refine"]), path


def test_bfloat16_model_stores_tensors_in_layer_dtype(setup):
    model, cal, _ = setup
    bf = TinyDiT().to(torch.bfloat16)
    bf.load_state_dict(model.state_dict())
    cal_bf = [((x.bfloat16(), t.bfloat16()), {}) for (x, t), _ in cal[:2]]
    plan = calibrate(bf, cal_bf, BASE, progress=False)
    lp = plan.layers["blocks.0.fc1"]
    assert lp.dtype == "bfloat16" and lp.lr_down.dtype == torch.bfloat16 and lp.bias_delta.dtype == torch.float32
    measured = measure_layer_errors(plan, bf, cal_bf)
    assert measured["blocks.0.fc1"] == pytest.approx(lp.errors["final"], rel=0.05)
