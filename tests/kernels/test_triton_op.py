"""``rtlynx::triton_sparse_matmul`` (a triton_op) and the pass that inlines it for Inductor on CUDA.

On the CPU: the op's body against the opaque op with the reference kernel, in Triton's interpreter;
the inlining pass on a graph of fake CUDA tensors, in a subprocess without the interpreter (its
kernels must be real ``triton.jit`` functions to be traced), with a stand-in Triton driver that
names an sm_90 target so that the tracer's mutation analysis compiles the kernels to TTIR; and the
backend's handling of ``run_dense()``. On a GPU, the compiled model.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lynx_compile
from lynx_compile import backend
from lynx_compile.config import LynxConfig
from lynx_compile.kernels import reference
from lynx_compile.kernels.registry import get_kernel
from lynx_compile.kernels import triton_compress as tc
from shared import DEVICE, DTYPES, not_installed, requires

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2**-7}


def _layer_inputs(dtype, batch_other=False, plan=True, seed=0):
    """x, other, bias and (with ``plan``) a calibration plan's lr_down, lr_up, perm and comp_bias."""
    gen = torch.Generator().manual_seed(seed)
    k, n = 128, 48

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    x = rand(3, 40, k)
    other = rand(3, k, n) if batch_other else rand(k, n).t().contiguous().t()  # weight.t() strides
    tensors = [x, other, rand(n)]
    if plan:
        tensors += [rand(k, 8), rand(8, n), torch.randperm(k, generator=gen).to(DEVICE),
                    torch.randn(n, generator=gen).to(DEVICE)]
    return tensors


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_other, plan", [(False, True), (True, True), (False, False)],
                         ids=["plan", "batched-plan", "no-plan"])
def test_triton_op_computes_the_layer_of_the_opaque_op(monkeypatch, dtype, batch_other, plan):
    monkeypatch.setenv(tc.POISON_ENV, "1")
    tensors = _layer_inputs(dtype, batch_other, plan)
    got = torch.ops.rtlynx.triton_sparse_matmul(*tensors, n=2, m=4, norm_comp=True)
    expected = torch.ops.rtlynx.sparse_matmul(*tensors, n=2, m=4, norm_comp=True, impl="reference")
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


@requires("triton", "triton")  # the triton_op is registered only with triton installed
def test_triton_op_rejects_what_the_op_rejects():
    x, other, bias = _layer_inputs(torch.float32, plan=False)
    with pytest.raises(ValueError, match=r"perm must be int64 of shape \(K=128,\), got torch.int32 \(128,\)"):
        torch.ops.rtlynx.triton_sparse_matmul(x, other, bias, perm=torch.arange(128, dtype=torch.int32))
    with pytest.raises(ValueError, match="K=128 is not divisible by M=3|unsupported N:M pattern"):
        torch.ops.rtlynx.triton_sparse_matmul(x, other, bias, n=2, m=3)


_INLINE_SCRIPT = textwrap.dedent("""
    import json
    import torch, triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from triton.backends.compiler import GPUTarget
    import lynx_compile
    from lynx_compile.passes.inline_triton import _arguments, inline_blocker, inline_triton_kernels


    class Sm90Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)


    triton.runtime.driver.set_active(Sm90Target())
    op = torch.ops.rtlynx.sparse_matmul


    def layers(x, w1, b1, lr_down, lr_up, perm, comp_bias, w2, w3):
        h = op(x, w1, b1, lr_down, lr_up, perm, comp_bias, n=2, m=4, norm_comp=True, impl="triton")
        h = op(torch.relu(h), w2, None, n=2, m=4, norm_comp=True, impl="reference")
        return op(h, w3, None, n=2, m=4, norm_comp=False, min_tokens=512, impl="triton")


    def describe(gm):
        nodes = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = getattr(node.target, "__name__", str(node.target))
            if name == "triton_kernel_wrapper_functional":
                table = torch._higher_order_ops.triton_kernel_wrap.kernel_side_table
                kernel = table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                nodes.append([name, kernel, node.kwargs["tensors_to_clone"],
                              sorted(k for k, v in node.kwargs["kwargs"].items() if isinstance(v, torch.fx.Node))])
            elif name.startswith("rtlynx") or "sparse_matmul" in name:
                nodes.append([name, _arguments(node)["impl"], inline_blocker(node)])
        return nodes


    result = {}
    for dtype, dynamic_m in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)):
        shape_env = ShapeEnv()
        mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
        rows = shape_env.create_symintnode(shape_env.create_symbol(256, ConstantSource("M")), hint=256)
        with mode:
            def t(*shape, dt=dtype):
                return torch.empty(*shape, device="cuda", dtype=dt)
            args = (t(rows if dynamic_m else 256, 128), t(128, 64), t(64), t(128, 8), t(8, 64),
                    t(128, dt=torch.int64), t(64, dt=torch.float32), t(64, 32), t(32, 16))
            gm = make_fx(layers)(*args)
        inlined = inline_triton_kernels(gm.graph)  # in the placeholders' fake mode
        gm.graph.lint()
        result[f"{dtype}-{'dynamic' if dynamic_m else 'static'}"] = {"inlined": sorted(inlined), "nodes": describe(gm)}
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def inlined_graphs():
    # triton itself, not its interpreter: the kernels are traced and compiled to TTIR, never run
    pytest.importorskip("triton", reason=not_installed("triton", "triton"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _INLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


COMPRESS_INPUTS = ["idx_ptr", "perm_ptr", "scale_ptr", "val_ptr", "x_ptr"]
GEMM_INPUTS = ["b_ptr", "bias_ptr", "idx_ptr", "out_ptr", "scale_ptr", "t_ptr", "u_ptr", "val_ptr"]
KEPT_REFERENCE = ["sparse_matmul.default", "reference", "kernel 'reference' is not the Triton route"]


@pytest.mark.parametrize("case", ["torch.bfloat16-static", "torch.float32-static"])
def test_inlining_replaces_the_triton_gemm_by_its_two_kernels_that_write_only_their_outputs(inlined_graphs, case):
    graph = inlined_graphs[case]
    # Static M: the third GEMM's min_tokens=512 was settled at compile time (M=256 is below it, so
    # the policy would not have rewritten it; here the graph is built by hand), and it is inlined too.
    assert graph["inlined"] == ["sparse_matmul", "sparse_matmul_2"]
    assert graph["nodes"] == [
        ["triton_kernel_wrapper_functional", "_compress_kernel", ["val_ptr", "idx_ptr", "scale_ptr"], COMPRESS_INPUTS],
        ["triton_kernel_wrapper_functional", "_sparse_mm_kernel", ["out_ptr"], GEMM_INPUTS],
        KEPT_REFERENCE,
        ["triton_kernel_wrapper_functional", "_compress_kernel", ["val_ptr", "idx_ptr", "scale_ptr"],
         ["idx_ptr", "perm_ptr", "scale_ptr", "val_ptr", "x_ptr"]],
        ["triton_kernel_wrapper_functional", "_sparse_mm_kernel", ["out_ptr"], GEMM_INPUTS],
    ]


def test_inlining_keeps_the_op_where_min_tokens_is_checked_at_run_time(inlined_graphs):
    graph = inlined_graphs["torch.bfloat16-dynamic"]
    assert graph["inlined"] == ["sparse_matmul"]
    assert graph["nodes"][2] == KEPT_REFERENCE
    assert graph["nodes"][3] == [
        "sparse_matmul.default", "triton",
        "M is dynamic and min_tokens=512 is checked at run time, which only the op can do"]


def test_backend_runs_the_captured_graph_inside_run_dense():
    calls = []
    run = backend.dense_inside_run_dense(lambda *a: calls.append(("compiled", a)) or "sparse",
                                         lambda *a: calls.append(("captured", a)) or "dense")
    assert run(1, 2) == "sparse"
    with lynx_compile.run_dense():
        assert run(3) == "dense"
        with lynx_compile.run_dense(False):  # nested, disabled: still inside an enabled one
            assert run(4) == "dense"
    assert run(5) == "sparse"
    assert calls == [("compiled", (1, 2)), ("captured", (3,)), ("captured", (4,)), ("compiled", (5,))]


class _Pass:
    """A pass pipeline after a compile: its report, or None after an FX graph cache hit."""

    def __init__(self, launches):
        from lynx_compile.report import GemmRecord, GraphReport

        records = [GemmRecord("l", "mm", "mm", "linear", [1, 1, 1], 1, "float32", bool(launch), "2:4", "triton", True,
                              "", launch=launch) for launch in launches or ()]
        self.report = None if launches is None else GraphReport(0, records, {})


INLINED, CUDA_GRAPHS = "its Triton kernels are inlined", "CUDA graphs replay without Python"


@pytest.mark.parametrize("launches, options, mode, expected", [
    (["op", "inductor"], {}, None, INLINED),
    (["op", "op"], {}, None, ""),                       # the ops read the switch
    (["inductor"], {"triton_op": False}, None, ""),    # (cannot happen: nothing is inlined then)
    (None, {}, None, INLINED),                          # an FX graph cache hit: not known, so it counts
    (None, {"triton_op": False}, None, ""),
    (["op"], {}, "reduce-overhead", CUDA_GRAPHS),
    (["op"], {"inductor_config": {"triton.cudagraphs": True}}, None, CUDA_GRAPHS),
    (["op"], {"inner": "eager"}, "reduce-overhead", ""),  # no Inductor, no CUDA graphs
    (["", ""], {}, "max-autotune", ""),                  # nothing rewritten: the graph is dense anyway
    (None, {"triton_op": False}, "max-autotune", CUDA_GRAPHS),
])
def test_backend_knows_which_graphs_cannot_read_the_dense_switch(launches, options, mode, expected):
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = LynxConfig.from_options(options)
    with FakeTensorMode():
        cpu, cuda = torch.empty(2), torch.empty(2, device="cuda")
    assert backend.dense_switch_blocker(_Pass(launches), config, mode, [cpu, 3, cuda]) == expected
    assert backend.dense_switch_blocker(_Pass(launches), config, mode, [cpu, 3]) == ""  # no CUDA input


def test_triton_op_option_is_validated():
    with pytest.raises(ValueError, match="option 'triton_op' must be True or False, got 'yes'"):
        LynxConfig.from_options({"triton_op": "yes"})


def _bf16_mlp_on_gpu() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda().to(torch.bfloat16)


@pytest.mark.gpu("Inductor compiles the inlined kernels")
@pytest.mark.triton
@torch.no_grad()
def test_compiled_triton_layers_are_inlined_and_match_the_reference_on_gpu():
    model = _bf16_mlp_on_gpu()
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="rtlynx", options={"min_tokens": 0, "kernel": "triton"})
    out = compiled(x)
    assert [(r.launch, r.launch_reason) for r in lynx_compile.reports()[-1].records] == [("inductor", "")] * 2
    h = reference.sparse_matmul(x.reshape(-1, 256), model[0].weight.t(), model[0].bias, n=2, m=4)
    expected = reference.sparse_matmul(nn.functional.gelu(h), model[2].weight.t(), model[2].bias, n=2, m=4)
    torch.testing.assert_close(out.reshape(-1, 128).float(), expected.float(), rtol=2**-7, atol=2e-2)
    with lynx_compile.run_dense():
        torch.testing.assert_close(compiled(x), model(x))


@torch.no_grad()
def test_compiled_graph_that_cannot_read_the_switch_runs_the_captured_graph_inside_run_dense(monkeypatch):
    """The wiring in ``rtlynx()``, on the CPU: the blocker is forced, as CUDA graphs or inlining would."""
    from lynx_compile.kernels import ops

    kernel_runs, dense_matmul = [], reference.dense_matmul
    monkeypatch.setattr(ops, "get_kernel", lambda name: kernel_runs.append(name) or get_kernel(name))
    monkeypatch.setattr(reference, "dense_matmul", lambda *a: kernel_runs.append("dense") or dense_matmul(*a))
    monkeypatch.setattr(backend, "dense_switch_blocker", lambda *args: "forced by the test")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)), torch.randn(2, 24, 32)
    compiled = torch.compile(model, backend="rtlynx", options={"min_tokens": 0})
    sparse = compiled(x)
    del kernel_runs[:]
    assert torch.equal(compiled(x), sparse) and kernel_runs == ["reference"] * 2
    del kernel_runs[:]
    with lynx_compile.run_dense():
        dense = compiled(x)
    assert kernel_runs == []  # no rtlynx op ran: the captured graph did
    torch.testing.assert_close(dense, model(x), rtol=0, atol=0)
    assert not torch.allclose(sparse, dense, rtol=1e-3, atol=1e-3)
    assert len(lynx_compile.reports()) == 1  # no recompile


@pytest.mark.gpu("CUDA graphs")
@torch.no_grad()
def test_run_dense_takes_effect_under_cuda_graphs_on_gpu():
    model = _bf16_mlp_on_gpu()
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)
    options = {"min_tokens": 0, "mode": "reduce-overhead", "selection": "always"}  # rewritten, whatever it measures
    compiled = torch.compile(model, backend="rtlynx", options=options)
    sparse = [compiled(x).clone() for _ in range(3)]  # warm-up, recording, replay
    with lynx_compile.run_dense():
        torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(compiled(x), sparse[-1])
    assert not torch.allclose(sparse[-1], model(x), rtol=1e-2, atol=1e-2)
    assert len(lynx_compile.reports()) == 1
