"""``transform()``: the rtlynx passes outside ``torch.compile``, for ``torch.export`` programs.

An exported program keeps the ``torch.ops.rtlynx.*`` calls; it runs, and reloads in a fresh process,
once ``import lynx_compile`` has registered the ops.
"""

from __future__ import annotations

from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument

from .backend import finish_report
from .config import LynxConfig
from .passes.pipeline import build_pipeline, check_purpose

_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def transform(program, options=None):
    """Rewrite the GEMMs of an ``ExportedProgram`` (or of an ATen ``GraphModule``) in place and return it.

    An exported program is first decomposed with Inductor's decomposition table, so its linears take
    the same ``addmm``/``mm`` forms that the compiled path rewrites.
    """
    config = LynxConfig.from_options(options)
    check_purpose(config, "export")
    if isinstance(program, ExportedProgram):
        from torch._inductor.decomposition import select_decomp_table

        program = program.run_decompositions(select_decomp_table())
        specs = program.graph_signature.input_specs
        params = frozenset(i for i, spec in enumerate(specs) if spec.kind in _WEIGHT_KINDS)
        gm = program.graph_module
    elif isinstance(program, fx.GraphModule):
        gm, params = program, None
    else:
        raise TypeError(f"transform() takes a torch.export.ExportedProgram or an fx.GraphModule, got "
                        f"{type(program).__name__}")
    pipeline = build_pipeline(config, purpose="export", param_inputs=params)
    pipeline(gm.graph)
    gm.recompile()
    if isinstance(program, ExportedProgram):
        _rename_outputs(program)
    finish_report(pipeline, config)
    return program


def _rename_outputs(program: ExportedProgram) -> None:
    """A rewritten GEMM that is a graph output has a new node name: the signature must name it too, or
    ``torch.export.save`` rejects the program."""
    outputs = program.graph.output_node().args[0]
    for spec, node in zip(program.graph_signature.output_specs, outputs):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node) and spec.arg.name != node.name:
            spec.arg = TensorArgument(name=node.name)
