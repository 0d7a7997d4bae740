"""The rewrite pass: classify every GEMM, ask the policy, and replace the chosen ones by the sparse op.

Input: a post-grad ATen graph. Output: the same graph where each GEMM the policy rewrites is one
``rtlynx::sparse_matmul`` node (see ``rewrite_gemm.py``), and one ``GemmRecord`` per GEMM, rewritten
or not, in ``context.records``.
"""

from __future__ import annotations

import hashlib

from torch import fx

from ..config import LynxConfig
from ..log import log
from .. import selection
from ..policy import decide, estimate
from ..report import GemmRecord
from .gemm_sites import as_gemm_site
from .rewrite_gemm import rewrite_gemm
from .source_digest import source_digest


class SparsifyGemms:
    name = "sparsify_gemms"

    def __init__(self, config: LynxConfig, plan=None, param_inputs: frozenset[int] | None = None):
        self.config = config
        self.plan = plan
        self.param_inputs = param_inputs

    def __call__(self, graph: fx.Graph, context) -> None:
        config = self.config
        # Classify each node only when reached: earlier rewrites replace nodes later GEMMs consume.
        for node in list(graph.nodes):
            site = as_gemm_site(node, self.param_inputs)
            if site is None:
                continue
            decision = decide(site, config, self.plan)
            cost = decision.cost or estimate(site, config, decision.kernel, break_even=False)[1]
            record = GemmRecord.from_decision(site, decision, config, cost)
            context.records.append(record)
            log.debug("rtlynx graph %d: %s %s %s -> %s", context.graph_index, site.name, site.op, record.shape,
                      f"{config.pattern} via {decision.kernel}" if decision.rewrite else f"dense ({decision.reason})")
            if decision.rewrite:
                n, m = config.nm
                new = rewrite_gemm(graph, site, n=n, m=m, norm_comp=config.norm_comp,
                                   min_tokens=decision.min_tokens, kernel=decision.kernel,
                                   plan_layer=decision.plan_layer)
                context.rewritten[new] = record

    def uuid(self) -> str:
        # dump_dir only changes where files go, and with it set the backend disables caches anyway.
        key = {k: v for k, v in self.config.summary().items() if k != "dump_dir"}
        key["param_inputs"] = sorted(self.param_inputs) if self.param_inputs is not None else None
        key["plan"] = self.plan.digest() if self.plan is not None else None
        key["timings"] = selection.cache_key(self.config)
        return hashlib.sha256((repr(sorted(key.items())) + source_digest(__name__)).encode()).hexdigest()
