"""``explain()``: what would ``backend="rtlynx"`` do to this model? A dry run that compiles nothing.

Dynamo traces the model, AOTAutograd lowers it with Inductor's decompositions (the same ATen forms
Inductor's post-grad passes see, through the backend's own ``lower_to_aten``), and the pipeline that
``build_pipeline`` makes for a compile runs on a copy of each forward graph, numbered like compiled
graphs. The model itself then runs its original dense graph, so the call costs about one eager
forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import fx

from .config import LynxConfig
from .backend import lower_to_aten, parameter_positions
from .passes.pipeline import build_pipeline
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
    config = LynxConfig.from_options({**(options or {}), "dump_dir": None})
    explanation = Explanation()

    def backend(gm, example_inputs):
        pipeline = build_pipeline(config, purpose="explain", param_inputs=parameter_positions(example_inputs))

        def forward_compiler(fw_gm, _inputs):
            pipeline(_copy(fw_gm).graph)
            explanation.graphs.append(pipeline.report)
            return fw_gm

        return lower_to_aten(gm, example_inputs, forward_compiler)

    torch.compile(model, backend=backend)(*args, **kwargs)
    return explanation
