"""``LynxPass``: classify every GEMM, ask the policy, rewrite, and describe what happened.

It is an Inductor ``CustomGraphPass`` (post-grad), so its ``uuid`` joins Inductor's FX graph
cache key: a change of options or of this package's pass code never reuses a stale compile.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._logging import trace_structured

from ..config import LynxConfig
from ..log import log
from ..policy import decide, estimate
from ..report import GemmRecord, GraphReport
from .gemm_sites import as_gemm_site
from .graph_artifacts import readable, region_svgs, repro_source
from .inline_triton import inline_blocker, inline_triton_kernels
from .rewrite_gemm import rewrite_gemm

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _source_digest() -> str:
    """Hash of the pass, policy and op sources: they decide what a cached graph contains."""
    digest = hashlib.sha256()
    for folder in ("passes", "kernels", "lynx_compile"):
        for path in sorted((_PACKAGE_ROOT / folder).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class LynxPass(CustomGraphPass):
    """Rewrites the forward graph in place; ``self.report`` holds the result of the last call.

    With ``inline_triton`` (the backend and ``explain`` set it from the ``triton_op`` option; exported
    programs keep the ops), GEMMs that run the Triton kernels on CUDA are then inlined
    (``inline_triton.py``).
    """

    def __init__(self, config: LynxConfig, graph_index: int = 0, param_inputs: frozenset[int] | None = None,
                 plan=None, inline_triton: bool = False):
        self.config = config
        self.inline_triton = inline_triton
        self.plan = plan
        self.param_inputs = param_inputs
        self.graph_index = graph_index
        self.report: GraphReport | None = None

    def __call__(self, graph: fx.Graph) -> None:
        config = self.config
        _trace_artifact("rtlynx_graph_before", lambda: readable(graph))
        artifacts = {"graph_before.py": readable(graph)} if config.dump_dir else {}
        records, rewritten = [], {}  # rewritten: new node -> its record
        # Classify each node only when reached: earlier rewrites replace nodes later GEMMs consume.
        for node in list(graph.nodes):
            site = as_gemm_site(node, self.param_inputs)
            if site is None:
                continue
            decision = decide(site, config, self.plan)
            cost = decision.cost or estimate(site, config, decision.kernel, break_even=False)[1]
            records.append(GemmRecord.from_decision(site, decision, config, cost))
            log.debug("rtlynx graph %d: %s %s %s -> %s", self.graph_index, site.name, site.op, records[-1].shape,
                      f"{config.pattern} via {decision.kernel}" if decision.rewrite else f"dense ({decision.reason})")
            if decision.rewrite:
                n, m = config.nm
                new = rewrite_gemm(graph, site, n=n, m=m, norm_comp=config.norm_comp,
                                   min_tokens=decision.min_tokens, kernel=decision.kernel,
                                   plan_layer=decision.plan_layer)
                rewritten[new] = records[-1]
        if config.dump_dir:  # drawn while the rewritten nodes are still ops
            artifacts.update(region_svgs(graph, list(rewritten)))
        self._launch(graph, rewritten)
        graph.lint()
        self.report = GraphReport(self.graph_index, records, config.summary())
        _trace_artifact("rtlynx_graph_after", lambda: readable(graph))
        _trace_artifact("rtlynx_report", lambda: self.report.table())
        if config.dump_dir:
            artifacts["graph_after.py"] = readable(graph)
            artifacts["repro.py"] = repro_source(graph, f"rtlynx graph {self.graph_index}")
            self.report.artifacts = artifacts

    def _launch(self, graph: fx.Graph, rewritten: dict) -> None:
        """Inline the Triton GEMMs that can be, and record for each rewritten GEMM who launches it."""
        blockers = {node: inline_blocker(node) for node in rewritten}
        inlined = inline_triton_kernels(graph) if self.inline_triton else set()
        for node, record in rewritten.items():
            record.launch = "inductor" if node.name in inlined else "op"
            if record.kernel == "triton" and node.name not in inlined:
                record.launch_reason = blockers[node] or "option triton_op=False (or an exported program)"

    def uuid(self) -> str:
        # dump_dir only changes where files go, and with it set the backend disables caches anyway.
        key = {k: v for k, v in self.config.summary().items() if k != "dump_dir"}
        key["param_inputs"] = sorted(self.param_inputs) if self.param_inputs is not None else None
        key["plan"] = self.plan.digest() if self.plan is not None else None
        key["inline_triton"] = self.inline_triton
        return hashlib.sha256((repr(sorted(key.items())) + _source_digest()).encode()).hexdigest()


def _trace_artifact(name: str, payload) -> None:
    """A ``trace_structured`` artifact, so graphs and reports show up in ``tlparse`` of a TORCH_TRACE run."""
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload)
