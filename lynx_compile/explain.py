"""``explain()``: what would ``backend="rtlynx"`` do to this model? A dry run that compiles nothing.

Dynamo traces the model, AOTAutograd lowers it with Inductor's decompositions (the same ATen forms
Inductor's post-grad passes see), and ``LynxPass`` runs on a copy of each forward graph. The model
itself then runs its original dense graph, so the call costs about one eager forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import fx

from .config import LynxConfig
from .passes.lynx_pass import LynxPass
from .report import GraphReport


@dataclass
class Explanation:
    """One ``GraphReport`` per graph Dynamo produced; ``str()`` is the tables."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def records(self):
        return [record for graph in self.graphs for record in graph.records]

    def __str__(self) -> str:
        return "\n\n".join(graph.table() for graph in self.graphs) or "no graphs were traced"

    def to_json(self) -> dict:
        return {"graphs": [graph.to_json() for graph in self.graphs]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def explain(model, *args, options=None, **kwargs) -> Explanation:
    """Trace ``model(*args, **kwargs)`` and return what the rtlynx passes decide for every GEMM."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from .backend import load_plan

    config = LynxConfig.from_options({**(options or {}), "dump_dir": None})
    plan = load_plan(config)
    explanation = Explanation()

    def backend(gm, example_inputs):
        params = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))

        def forward_compiler(fw_gm, _inputs):
            lynx_pass = LynxPass(config, len(explanation.graphs), params, plan, inline_triton=config.triton_op)
            lynx_pass(_copy(fw_gm).graph)
            explanation.graphs.append(lynx_pass.report)
            return fw_gm

        return aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda bw_gm, _: bw_gm,
                            decompositions=select_decomp_table())(gm, example_inputs)

    torch.compile(model, backend=backend)(*args, **kwargs)
    return explanation
