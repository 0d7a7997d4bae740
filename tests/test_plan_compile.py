"""A calibration plan compiled into the graph: its tensors are constants, and it equals the plan's
eager model; dense denoising steps switch at run time without a recompile."""

import dataclasses
import re

import pytest
import torch

import lynx_compile
from lynx_compile import DenseSteps, run_dense
from lynx_compile.calibration import calibrate
from lynx_compile.policy import PlanMismatchError
from test_calibration import BASE, TinyDiT, sample_tokens, setup  # noqa: F401  (setup is a fixture)


@pytest.fixture(scope="module")
def saved_plan(setup, tmp_path_factory):  # noqa: F811
    model, cal, _ = setup
    plan = calibrate(model, cal[:4], {**BASE, "permutation": True, "error_budget": None}, progress=False)
    return plan, plan.save(tmp_path_factory.mktemp("plan"))


def _options(path, **extra):
    return {"plan": str(path), "min_tokens": 0, "op_kinds": "linear", **extra}


@torch.no_grad()
def test_compiled_plan_equals_the_plans_eager_model(setup, saved_plan):  # noqa: F811
    model, _, held = setup
    plan, path = saved_plan
    (x, t), _ = held[0]
    out = torch.compile(model, backend="rtlynx", options=_options(path))(x, t)

    (report,) = lynx_compile.reports()
    by_name = {r.name: r for r in report.records}
    for name, layer in plan.layers.items():
        record = by_name[name]
        assert record.rewritten == layer.sparse, name
        if layer.sparse:
            assert record.compensation.startswith("norm+low-rank(r=8)+bias") and record.plan_errors == layer.errors
        else:
            assert record.reason == f"plan keeps it dense: {layer.reason}"

    # The plan's eager model compiled by plain Inductor computes the non-GEMM ops with the same
    # kernels, so the top-k selections see identical inputs. Inductor fuses the residual adds around
    # the two kinds of call differently: rounding-level differences remain (a wrong plan tensor or a
    # flipped selection moves outputs by orders of magnitude more).
    torch._dynamo.reset()
    with plan.apply_eager(model):
        expected = torch.compile(model, backend="inductor")(x, t)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_plan_compensation_lowers_the_model_error(setup, saved_plan):  # noqa: F811
    model, _, held = setup
    _, path = saved_plan
    (x, t), _ = held[1]
    dense = model(x, t)
    plain = torch.compile(model, backend="rtlynx", options={"min_tokens": 0, "op_kinds": "linear"})(x, t)
    torch._dynamo.reset()
    planned = torch.compile(model, backend="rtlynx", options=_options(path))(x, t)
    error = lambda y: ((y - dense).norm() / dense.norm()).item()  # noqa: E731
    assert error(planned) < 0.8 * error(plain)


@torch.no_grad()
def test_dense_steps_switch_at_run_time_without_recompiling(setup, saved_plan):  # noqa: F811
    model, _, held = setup
    _, path = saved_plan
    (x, _), _ = held[2]
    compiled = torch.compile(model, backend="rtlynx", options=_options(path))
    schedule = DenseSteps(6, first=2, last=1)
    assert [schedule.is_dense(i) for i in range(6)] == [True, True, False, False, False, True]
    for step in range(6):
        t = torch.full((x.shape[0],), 1 - step / 6)
        with schedule.step(step):
            out = compiled(x, t)
        if schedule.is_dense(step):
            torch.testing.assert_close(out, model(x, t), rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(out, model(x, t), rtol=1e-3, atol=1e-3)
    assert len(lynx_compile.reports()) == 1  # one compile for the whole loop
    with run_dense():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-5, atol=1e-5)
    assert len(lynx_compile.reports()) == 1


def test_dense_steps_rejects_bad_values():
    with pytest.raises(ValueError, match=re.escape("DenseSteps needs total >= 1 and first, last >= 0; got 0, 1, 0")):
        DenseSteps(0, first=1)
    with pytest.raises(ValueError, match=re.escape("step 6 is outside the schedule's range(0, 6)")):
        DenseSteps(6).is_dense(6)


@torch.no_grad()
def test_plan_for_another_model_is_a_clear_error(saved_plan):
    _, path = saved_plan
    other = TinyDiT(hidden=96).eval()
    (x, t) = sample_tokens(torch.Generator().manual_seed(5))
    with pytest.raises(Exception) as info:
        torch.compile(other, backend="rtlynx", options=_options(path))(x, t)
    error = info.value.inner_exception
    assert isinstance(error, PlanMismatchError)
    assert re.fullmatch(r"plan layer 'blocks\.0\.fc1' has K=64, N=\d+ but the model's GEMM has K=64, N=96: "
                        r"the plan is for another model", str(error))


@torch.no_grad()
def test_plan_and_options_must_agree(setup, saved_plan):  # noqa: F811
    model, _, held = setup
    _, path = saved_plan
    (x, t), _ = held[0]
    message = (f"plan {path} was calibrated for pattern '2:4' with norm_comp=True, but the options say pattern "
               f"'4:8' with norm_comp=True; compile with the plan's settings or calibrate again")
    with pytest.raises(Exception, match=re.escape(message)):
        torch.compile(model, backend="rtlynx", options=_options(path, pattern="4:8"))(x, t)


def test_plan_option_must_be_a_path():
    with pytest.raises(ValueError, match="option 'plan' must be the path of a saved calibration plan"):
        lynx_compile.LynxConfig.from_options({"plan": 3})


def test_plan_digest_changes_with_any_tensor(saved_plan):
    plan, _ = saved_plan
    changed = plan.copy()
    layer = next(layer for layer in changed.layers.values() if layer.lr_up is not None)
    layer.lr_up = layer.lr_up.clone()
    layer.lr_up.view(-1)[0] += 1
    assert plan.digest() == plan.copy().digest() != changed.digest()
    assert dataclasses.is_dataclass(plan)
