"""The ``rtlynx`` torch.compile backend.

Dynamo hands us an FX graph; AOTAutograd and Inductor's decompositions lower it to ATen, where
every linear becomes one mm/addmm node. ``LynxPass`` runs there as Inductor's post-grad custom pass,
so everything that is not a GEMM is still fused by Inductor. ``inner="eager"`` runs the same pass on
the same decomposed graph and executes it op by op, for debugging.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import torch
from torch import fx

from . import report as reports
from .config import LynxConfig
from .kernels import dense_mode
from .log import log
from .passes.lynx_pass import LynxPass

_graph_counter = itertools.count()
next_graph_index = _graph_counter.__next__  # one numbering for every graph the passes see


def _mode_patches(mode: str | None) -> dict[str, Any]:
    """Inductor's own mapping from ``torch.compile(mode=...)`` to config, as Inductor applies it."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def _inner_compile(gm: fx.GraphModule, example_inputs, **kwargs):
    """Inductor's compile_fx_inner, without our pass on backward graphs.

    The backward graph (training) keeps its dense GEMMs: gradients are those of the dense layers
    evaluated at the same saved activations, i.e. a straight-through estimator.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner

    if kwargs.get("is_backward"):
        with inductor_config.patch(post_grad_custom_post_pass=None):
            return compile_fx_inner(gm, example_inputs, **kwargs)
    return compile_fx_inner(gm, example_inputs, **kwargs)


def _compile_inductor(gm, example_inputs, lynx_pass: LynxPass, config: LynxConfig, mode):
    from torch._inductor.compile_fx import compile_fx

    patches = _mode_patches(mode)
    patches.update(dict(config.inductor_config))
    # Set for the whole compile, so that every cache key (AOTAutograd's and the FX graph cache's)
    # holds the pass's uuid: a graph compiled without our pass, or with other options, never
    # answers for this one.
    patches["post_grad_custom_post_pass"] = lynx_pass
    if config.dump_dir:
        # A cache hit skips post-grad passes, and with them the dumps the user asked for.
        patches["force_disable_caches"] = True
    return compile_fx(gm, example_inputs, inner_compile=_inner_compile, config_patches=patches)


def _compile_eager(gm, example_inputs, lynx_pass: LynxPass):
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def forward_compiler(fw_gm: fx.GraphModule, _inputs):
        lynx_pass(fw_gm.graph)
        fw_gm.recompile()
        return fw_gm

    def backward_compiler(bw_gm: fx.GraphModule, _inputs):
        return bw_gm

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                        decompositions=select_decomp_table())(gm, example_inputs)


def finish_report(lynx_pass: LynxPass, config: LynxConfig) -> None:
    """Record, log and (with ``dump_dir``) write what the pass did."""
    report = lynx_pass.report
    if report is None:
        log.info("rtlynx graph %d: loaded from Inductor's cache; the rewrites are those of the cached compile",
                 lynx_pass.graph_index)
        return
    reports.record(report)
    log.info(report.summary_line())
    if config.dump_dir:
        where = reports.write_dump(report, config.dump_dir)
        log.info("rtlynx graph %d: dump written to %s", lynx_pass.graph_index, where)


def may_have_inlined_kernels(lynx_pass: LynxPass, config: LynxConfig, example_inputs) -> bool:
    """Whether the compiled graph may launch inlined Triton kernels, which cannot read ``run_dense()``.

    Without a report (an FX graph cache hit) it is not known, so any graph with a CUDA input that
    was compiled with ``triton_op=True`` counts.
    """
    if not config.triton_op:
        return False
    if lynx_pass.report is not None:
        return any(record.launch == "inductor" for record in lynx_pass.report.records)
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)


def dense_inside_run_dense(compiled, captured: fx.GraphModule):
    """``compiled``, except inside ``run_dense()``, where the graph Dynamo captured runs, eagerly and dense.

    Inlined kernels are fixed when the graph is compiled, so they cannot read the switch at run
    time as ``rtlynx::sparse_matmul`` does. The captured graph holds the original dense layers,
    and running it needs no recompile.
    """
    def run(*args):
        return captured(*args) if dense_mode.active() else compiled(*args)

    return run


def load_plan(config: LynxConfig):
    """The calibration plan named by ``options["plan"]``, checked against the options; None without one."""
    if config.plan is None:
        return None
    from .plan import Plan

    plan = Plan.load(config.plan)
    if (plan.pattern, plan.norm_comp) != (config.pattern, config.norm_comp):
        raise ValueError(f"plan {config.plan} was calibrated for pattern {plan.pattern!r} with norm_comp="
                         f"{plan.norm_comp}, but the options say pattern {config.pattern!r} with norm_comp="
                         f"{config.norm_comp}; compile with the plan's settings or calibrate again")
    return plan


def rtlynx(gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
           options: Mapping[str, Any] | LynxConfig | None = None):
    """``torch.compile(model, backend="rtlynx", options={...})``: N:M activation-sparse GEMMs."""
    config = LynxConfig.from_options(options)
    if mode not in (None, "default") and config.mode not in (None, mode):
        raise ValueError(f"mode given twice with different values: {mode!r} and options['mode']={config.mode!r}")
    mode = config.mode if mode in (None, "default") else mode
    graph_index = next_graph_index()
    param_inputs = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))
    lynx_pass = LynxPass(config, graph_index, param_inputs, load_plan(config), inline_triton=config.triton_op)
    if config.inner == "eager":
        compiled = _compile_eager(gm, example_inputs, lynx_pass)
    else:
        compiled = _compile_inductor(gm, example_inputs, lynx_pass, config, mode)
    finish_report(lynx_pass, config)
    if may_have_inlined_kernels(lynx_pass, config, example_inputs):
        return dense_inside_run_dense(compiled, gm)
    return compiled


def register() -> None:
    """Register ``rtlynx`` with Dynamo, unless the entry point is the one loading us right now.

    Dynamo resolves an entry-point backend by importing it and then calling ``register_backend``
    itself, which rejects a name that is already taken.
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if "rtlynx" in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get("rtlynx"), EntryPoint):
        return
    registry.register_backend(rtlynx, name="rtlynx")
