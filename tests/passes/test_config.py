"""Option validation: every bad input names the key and lists the valid choices."""

import re

import pytest
import torch

from lynx_compile import LynxConfig
from lynx_compile.config import DEFAULT_MIN_TOKENS


def test_defaults():
    config = LynxConfig.from_options(None)
    assert (config.pattern, config.nm, config.norm_comp, config.min_tokens) == ("2:4", (2, 4), True, DEFAULT_MIN_TOKENS)
    assert config.op_kinds == ("linear", "matmul") and config.kernel == "auto" and config.inner == "inductor"
    assert LynxConfig.from_options({"pattern": "dense"}).nm is None


def test_frozen_and_hashable():
    inductor = {"max_autotune": False}
    config = LynxConfig.from_options({"include": ["blocks"], "op_kinds": "linear", "inductor_config": inductor})
    assert hash(config) == hash(LynxConfig.from_options({"include": "blocks", "op_kinds": ["linear"],
                                                          "inductor_config": inductor}))
    with pytest.raises(AttributeError):
        config.pattern = "1:2"


@pytest.mark.parametrize("options, message", [
    ({"patern": "2:4"}, "unknown option 'patern'; valid options: 'pattern', 'norm_comp'"),
    ({"pattern": "3:4"}, "option 'pattern' has invalid value '3:4'; valid choices: '2:4', '1:2', '4:8', 'dense'"),
    ({"pattern": "2:5"}, "option 'pattern' has invalid value '2:5'; valid choices: '2:4', '1:2', '4:8', 'dense'"),
    ({"pattern": 2}, "option 'pattern' has invalid value 2; valid choices"),
    ({"op_kinds": ["conv"]}, "option 'op_kinds' has invalid value 'conv'; valid choices: 'linear', 'matmul'"),
    ({"op_kinds": []}, "option 'op_kinds' must name at least one of 'linear', 'matmul'"),
    ({"min_tokens": -1}, "option 'min_tokens' must be an integer >= 0 or 'auto', got -1"),
    ({"min_tokens": True}, "option 'min_tokens' must be an integer >= 0 or 'auto', got True"),
    ({"min_tokens": "512"}, "option 'min_tokens' must be an integer >= 0 or 'auto', got '512'"),
    ({"device_profile": "B200"}, "option 'device_profile' has invalid value 'B200'; valid choices: 'H100', 'H200', 'A100', 'L40S', 'H20'"),
    ({"include": "blocks.(("}, "option 'include': invalid regex 'blocks.(('"),
    ({"exclude": 3}, "option 'exclude' must be a regex string or a list of them, got 3"),
    ({"kernel": "cutlass"}, "option 'kernel' has invalid value 'cutlass'; valid choices: 'auto', 'reference', 'triton', 'cusparselt', 'fused'"),
    ({"inner": "aot_eager"}, "option 'inner' has invalid value 'aot_eager'; valid choices: 'inductor', 'eager'"),
    ({"mode": "fast"}, "option 'mode' has invalid value 'fast'; valid choices: None, 'default', 'reduce-overhead'"),
    ({"norm_comp": 1}, "option 'norm_comp' must be True or False, got 1"),
    ({"dump_dir": 5}, "option 'dump_dir' must be a path or None, got 5"),
    ({"inductor_config": ["x"]}, "option 'inductor_config' must be a dict of Inductor config keys"),
    ({"inductor_config": {"no_such_key": 1}}, "option 'inductor_config': 'no_such_key' is not a torch._inductor.config key"),
])
def test_bad_options_raise_value_error_naming_key_and_choices(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LynxConfig.from_options(options)


def test_bad_option_through_torch_compile_surfaces_the_same_message():
    fn = torch.compile(torch.nn.Linear(8, 8), backend="rtlynx", options={"pattern": "3:4"})
    with pytest.raises(Exception, match=re.escape("option 'pattern' has invalid value '3:4'; valid choices")):
        fn(torch.randn(2, 8))


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LYNX_DUMP_DIR", str(tmp_path))
    assert LynxConfig.from_options({}).dump_dir == str(tmp_path)
    assert LynxConfig.from_options({"dump_dir": None}).dump_dir is None
