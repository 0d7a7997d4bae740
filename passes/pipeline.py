"""The rtlynx pass pipeline: one ordered list of graph passes, built from the options in one place.

``torch.compile`` (as Inductor's post-grad custom pass, or with ``inner="eager"``), ``explain()`` and
``transform()`` for exported programs all run what :func:`build_pipeline` returns, so the three
rewrite the same GEMMs the same way and number their graphs alike. As in vLLM's post-grad pass
manager, the pipeline is the one ``CustomGraphPass`` Inductor sees, and its ``uuid`` joins the
uuids of its passes in order, so Inductor's FX graph cache never serves a graph that other passes,
options or code would have written differently.

A pass is a small object with a ``name``, ``__call__(graph, context)`` that changes the graph in
place, and a ``uuid()`` that covers its settings and its source (``source_digest``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._logging import trace_structured

from ..config import LynxConfig
from ..plan import load_plan
from ..report import GraphReport, next_graph_index
from .graph_artifacts import DrawRewrittenRegions, readable, repro_source
from .inline_triton import InlineTritonKernels
from .source_digest import source_digest
from .sparsify_gemms import SparsifyGemms

PURPOSES = ("compile", "explain", "export")


@dataclass
class PassContext:
    """What the passes of one run share: the graph's number in, its records and dump files out."""

    graph_index: int
    records: list = field(default_factory=list)     # one GemmRecord per GEMM, in graph order
    rewritten: dict = field(default_factory=dict)   # new rtlynx op node -> its GemmRecord
    artifacts: dict = field(default_factory=dict)   # dump files by name (only with dump_dir)


class LynxPipeline(CustomGraphPass):
    """Runs its passes in order on a forward graph; ``self.report`` holds the result of the last run.

    After an Inductor FX graph cache hit the passes do not run, and ``report`` stays None.
    """

    def __init__(self, config: LynxConfig, passes: list, graph_index: int):
        self.config = config
        self.passes = list(passes)
        self.graph_index = graph_index
        self.report: GraphReport | None = None
        self._uuid: str | None = None

    @property
    def pass_names(self) -> list[str]:
        return [p.name for p in self.passes]

    def __call__(self, graph: fx.Graph) -> None:
        dump = self.config.dump_dir is not None
        context = PassContext(self.graph_index)
        _trace_artifact("rtlynx_graph_before", lambda: readable(graph))
        if dump:
            context.artifacts["graph_before.py"] = readable(graph)
        for graph_pass in self.passes:
            graph_pass(graph, context)
        graph.lint()
        self.report = GraphReport(self.graph_index, context.records, self.config.summary())
        _trace_artifact("rtlynx_graph_after", lambda: readable(graph))
        _trace_artifact("rtlynx_report", lambda: self.report.table())
        if dump:
            context.artifacts["graph_after.py"] = readable(graph)
            context.artifacts["repro.py"] = repro_source(graph, f"rtlynx graph {self.graph_index}")
            self.report.artifacts = context.artifacts

    def uuid(self) -> str:
        if self._uuid is None:  # asked for by every cache lookup; the passes and the plan never change
            parts = [source_digest(__name__), *(f"{p.name}:{p.uuid()}" for p in self.passes)]
            self._uuid = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return self._uuid


def check_purpose(config: LynxConfig, purpose: str) -> None:
    """The options' limits for one purpose, checked before any graph work."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown pipeline purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
    if purpose == "export" and config.plan is not None:
        raise ValueError("transform() does not apply calibration plans yet; compile with "
                         "torch.compile(..., options={'plan': ...}) instead")


def build_pipeline(config: LynxConfig, *, purpose: str = "compile", param_inputs: frozenset[int] | None = None,
                   graph_index: int | None = None) -> LynxPipeline:
    """The passes for ``config``, in order, for a compile, an ``explain()`` or an exported program.

    ``param_inputs`` are the graph-input positions that hold parameters (None: every input counts as
    a weight). The calibration plan named by the options is loaded and checked here.
    """
    check_purpose(config, purpose)
    plan, config = load_plan(config)  # the plan's own pattern, filters and min_tokens fill the options not given
    passes = [SparsifyGemms(config, plan, param_inputs)]
    if config.dump_dir is not None:  # drawn while the rewritten GEMMs are still single ops
        passes.append(DrawRewrittenRegions())
    # Exported programs keep the ops: they must run wherever `import lynx_compile` registered them.
    passes.append(InlineTritonKernels(enabled=config.triton_op and purpose != "export"))
    return LynxPipeline(config, passes, next_graph_index() if graph_index is None else graph_index)


def _trace_artifact(name: str, payload) -> None:
    """A ``trace_structured`` artifact, so graphs and reports show up in ``tlparse`` of a TORCH_TRACE run."""
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload)
