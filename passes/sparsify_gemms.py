"""The rewrite pass: classify every GEMM, ask the policy, and replace the chosen ones by the sparse op.

Input: a post-grad ATen graph. Output: the same graph where each GEMM the policy rewrites is one
``rtlynx::sparse_matmul`` node (see ``rewrite_gemm.py``), and one ``GemmRecord`` per GEMM, rewritten
or not, in ``context.records``.
"""

from __future__ import annotations

import difflib
import hashlib

from torch import fx

from ..config import LynxConfig
from ..log import log
from .. import selection
from ..policy import PlanMismatchError, decide, estimate
from ..report import GemmRecord
from .gemm_sites import as_gemm_site
from .rewrite_gemm import rewrite_gemm
from .source_digest import source_digest


def check_plan_matches(plan, linear_paths: list[str], where) -> None:
    """A plan none of whose layers is a linear GEMM of this graph is for another model (or, under
    ``compile_repeated_blocks``, a whole-model plan where the block graph's paths are relative): an
    error, never a silent compile without compensation."""
    if not linear_paths or any(path in plan.layers for path in linear_paths):
        return
    first = linear_paths[0]
    nested = [p for p in plan.layers if p.endswith("." + first) or first.endswith("." + p)]  # a block vs the model
    close = nested or difflib.get_close_matches(first, list(plan.layers), n=1)
    hint = f"; the closest plan layer to {first!r} is {close[0]!r}" if close else ""
    raise PlanMismatchError(
        f"plan {where} names none of this graph's {len(linear_paths)} linear layers (e.g. {linear_paths[:3]}; the "
        f"plan has e.g. {list(plan.layers)[:3]}){hint}. Layer paths must be the module paths of the compiled "
        f"module: a plan calibrated on a whole model does not apply to a block compiled alone "
        f"(compile_repeated_blocks), whose paths are relative to the block")


class SparsifyGemms:
    name = "sparsify_gemms"

    def __init__(self, config: LynxConfig, plan=None, param_inputs: frozenset[int] | None = None):
        self.config = config
        self.plan = plan
        self.param_inputs = param_inputs

    def __call__(self, graph: fx.Graph, context) -> None:
        config = self.config
        linear_paths = []
        # Classify each node only when reached: earlier rewrites replace nodes later GEMMs consume.
        for node in list(graph.nodes):
            site = as_gemm_site(node, self.param_inputs)
            if site is None:
                continue
            if site.kind == "linear":
                linear_paths.append(site.module_path)
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
        if self.plan is not None:
            check_plan_matches(self.plan, linear_paths, config.plan)

    def uuid(self) -> str:
        # dump_dir only changes where files go, and with it set the backend disables caches anyway.
        key = {k: v for k, v in self.config.summary().items() if k != "dump_dir"}
        key["param_inputs"] = sorted(self.param_inputs) if self.param_inputs is not None else None
        key["plan"] = self.plan.digest() if self.plan is not None else None
        key["timings"] = selection.cache_key(self.config)
        return hashlib.sha256((repr(sorted(key.items())) + source_digest(__name__)).encode()).hexdigest()
