"""A calibration plan brings its own pattern, filters and min_tokens: the backend uses them unless the
options set them, a conflict is an error naming both values, and a plan that names none of the
compiled graph's layers is an error, never a silent compile without compensation."""

import re

import pytest
import torch
from torch import nn

from lynx_compile import LynxConfig
from lynx_compile.plan import LayerPlan, Plan, load_plan
from lynx_compile.policy import PlanMismatchError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _plan(tmp_path, layer="fc1"):
    plan = Plan(pattern="4:8", norm_comp=True, min_tokens=16, options={"include": ["fc1"], "exclude": ["head"]})
    plan.layers[layer] = LayerPlan(layer, 16, 32, "float32", sparse=True)
    return plan.save(tmp_path / "plan")


def test_the_plans_settings_fill_the_options_not_given(tmp_path):
    path = _plan(tmp_path)
    plan, config = load_plan(LynxConfig.from_options({"plan": str(path), "op_kinds": "linear"}))
    assert (config.pattern, config.norm_comp, config.include, config.exclude, config.min_tokens) == (
        "4:8", True, ("fc1",), ("head",), 16)
    assert config.op_kinds == ("linear",) and set(plan.layers) == {"fc1"}
    _, same = load_plan(LynxConfig.from_options({"plan": str(path), "min_tokens": 16, "include": "fc1"}))
    assert (same.min_tokens, same.include) == (16, ("fc1",))  # given, and equal: fine


@pytest.mark.parametrize("option, value, shown", [
    ("pattern", "2:4", "option 'pattern' is '2:4' but plan {path} was calibrated with pattern='4:8'"),
    ("min_tokens", 512, "option 'min_tokens' is 512 but plan {path} was calibrated with min_tokens=16"),
    ("exclude", [], "option 'exclude' is () but plan {path} was calibrated with exclude=('head',)"),
])
def test_an_option_that_contradicts_the_plan_is_an_error_naming_both(tmp_path, option, value, shown):
    path = _plan(tmp_path)
    message = shown.format(path=path) + "; leave the option out to use the plan's value, or calibrate again"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_plan(LynxConfig.from_options({"plan": str(path), option: value}))


@torch.no_grad()
def test_the_plan_applies_with_its_own_settings_and_a_plan_for_other_layers_is_an_error(tmp_path):
    import lynx_compile

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(20, 16)  # M=20: below the backend's default 512, above the plan's 16
    options = {"plan": str(_plan(tmp_path)), "inner": "eager"}
    torch.compile(model, backend="rtlynx", options=options)(x)
    assert [(r.name, r.rewritten, r.pattern, r.reason) for r in lynx_compile.reports()[-1].records] == [
        ("fc1", True, "4:8", ""), ("fc2", False, "dense", "module path not matched by include")]

    torch._dynamo.reset()
    options = {"plan": str(_plan(tmp_path / "other", layer="blocks.0.fc1")), "inner": "eager"}
    with pytest.raises(Exception) as info:
        torch.compile(model, backend="rtlynx", options=options)(x)
    error = info.value.inner_exception
    assert isinstance(error, PlanMismatchError)
    assert str(error).startswith(f"plan {tmp_path / 'other' / 'plan'} names none of this graph's 2 linear layers "
                                 f"(e.g. ['fc1', 'fc2']; the plan has e.g. ['blocks.0.fc1']); the closest plan layer "
                                 f"to 'fc1' is 'blocks.0.fc1'")
