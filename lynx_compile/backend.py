"""The ``rtlynx`` torch.compile backend.

Dynamo hands us an FX graph; AOTAutograd and Inductor's decompositions lower it to ATen, where
every linear becomes one mm/addmm node. The pass pipeline (``passes/pipeline.py``) runs there as
Inductor's post-grad custom pass, so everything that is not a GEMM is still fused by Inductor.
``inner="eager"`` runs the same pipeline on the same decomposed graph (``lower_to_aten``) and
executes it op by op, for debugging; ``explain()`` lowers the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import fx

from . import report as reports
from .config import LynxConfig
from .kernels import dense_mode
from .log import log
from .passes.pipeline import LynxPipeline, build_pipeline


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


def _inductor_patches(config: LynxConfig, mode) -> dict[str, Any]:
    """The Inductor config the user asked for: the mode's, then ``inductor_config`` over it."""
    patches = _mode_patches(mode)
    patches.update(dict(config.inductor_config))
    return patches


def _compile_inductor(gm, example_inputs, pipeline: LynxPipeline, config: LynxConfig, mode):
    from torch._inductor.compile_fx import compile_fx

    patches = _inductor_patches(config, mode)
    # Set for the whole compile, so that every cache key (AOTAutograd's and the FX graph cache's)
    # holds the pass's uuid: a graph compiled without our pass, or with other options, never
    # answers for this one.
    patches["post_grad_custom_post_pass"] = pipeline
    if config.dump_dir:
        # A cache hit skips post-grad passes, and with them the dumps the user asked for.
        patches["force_disable_caches"] = True
    return compile_fx(gm, example_inputs, inner_compile=_inner_compile, config_patches=patches)


def lower_to_aten(gm, example_inputs, forward_compiler):
    """AOTAutograd with Inductor's decompositions: ``forward_compiler`` gets the forward graph in the
    ATen forms that Inductor's post-grad passes see; the backward graph runs as it is."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda bw_gm, _inputs: bw_gm,
                        decompositions=select_decomp_table())(gm, example_inputs)


def _compile_eager(gm, example_inputs, pipeline: LynxPipeline):
    def forward_compiler(fw_gm: fx.GraphModule, _inputs):
        pipeline(fw_gm.graph)
        fw_gm.recompile()
        return fw_gm

    return lower_to_aten(gm, example_inputs, forward_compiler)


def finish_report(pipeline: LynxPipeline, config: LynxConfig) -> None:
    """Record, log and (with ``dump_dir``) write what the passes did."""
    report = pipeline.report
    if report is None:
        log.info("rtlynx graph %d: loaded from Inductor's cache; the rewrites are those of the cached compile",
                 pipeline.graph_index)
        return
    reports.record(report)
    log.info(report.summary_line())
    if config.dump_dir:
        where = reports.write_dump(report, config.dump_dir)
        log.info("rtlynx graph %d: dump written to %s", pipeline.graph_index, where)


def dense_switch_blocker(pipeline: LynxPipeline, config: LynxConfig, mode, example_inputs) -> str:
    """Why the compiled graph cannot read ``run_dense()`` at run time, or "" when its ops can.

    - Inlined Triton kernels are fixed when the graph is compiled.
    - A CUDA graph replays without entering Python, so the ops' check does not run.
    After an FX graph cache hit there is no report, so what was inlined or rewritten is not known:
    every graph with a CUDA input that could have it counts.
    """
    if not any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs):
        return ""  # no CUDA graph, and nothing inlined (only CUDA GEMMs are)
    report = pipeline.report
    if config.inner == "inductor":
        from torch._inductor import config as inductor_config

        cudagraphs = _inductor_patches(config, mode).get("triton.cudagraphs", inductor_config.triton.cudagraphs)
        if cudagraphs and (report is None or report.num_rewritten):
            return "CUDA graphs replay without Python"
    if config.triton_op and (report is None or any(r.launch == "inductor" for r in report.records)):
        return "its Triton kernels are inlined"
    return ""


def dense_inside_run_dense(compiled, captured: fx.GraphModule):
    """``compiled``, except inside ``run_dense()``, where the graph Dynamo captured runs, eagerly and dense.

    For graphs that cannot read the switch themselves (``dense_switch_blocker``). The captured
    graph holds the original dense layers, and running it needs no recompile.
    """
    def run(*args):
        return captured(*args) if dense_mode.active() else compiled(*args)

    return run


def parameter_positions(example_inputs) -> frozenset[int]:
    """The graph inputs that are ``nn.Parameter``s: a GEMM whose right operand is one is a linear layer."""
    return frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))


def rtlynx(gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
           options: Mapping[str, Any] | LynxConfig | None = None):
    """``torch.compile(model, backend="rtlynx", options={...})``: N:M activation-sparse GEMMs."""
    config = LynxConfig.from_options(options)
    if mode not in (None, "default") and config.mode not in (None, mode):
        raise ValueError(f"mode given twice with different values: {mode!r} and options['mode']={config.mode!r}")
    mode = config.mode if mode in (None, "default") else mode
    pipeline = build_pipeline(config, purpose="compile", param_inputs=parameter_positions(example_inputs))
    if config.inner == "eager":
        compiled = _compile_eager(gm, example_inputs, pipeline)
    else:
        compiled = _compile_inductor(gm, example_inputs, pipeline, config, mode)
    finish_report(pipeline, config)
    blocker = dense_switch_blocker(pipeline, config, mode, example_inputs)
    if blocker:
        log.info("rtlynx graph %d: %s, so inside run_dense() the captured graph runs eagerly", pipeline.graph_index,
                 blocker)
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
