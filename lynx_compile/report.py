"""What the passes did, per GEMM and per compiled graph: in memory, as tables and as files."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate

from .kernels.contract import dtype_name


def _compensation(decision, config) -> str:
    """E.g. ``norm+low-rank(r=8)+bias+perm``: what corrects this GEMM's sparsification error."""
    if not decision.rewrite:
        return ""
    parts = ["norm"] if config.norm_comp else []
    layer = decision.plan_layer
    if layer is not None:
        if layer.lr_down is not None:
            parts.append(f"low-rank(r={layer.lr_down.shape[1]})")
        if layer.bias_delta is not None:
            parts.append("bias")
        if layer.perm is not None:
            parts.append("perm")
    return "+".join(parts) or "none"


def _us(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _to_us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1000.0


def _plain(value):
    """ints stay ints; symbolic sizes become their expression (``s0``, ``2*s1``)."""
    return value if isinstance(value, int) else str(value)


@dataclass
class GemmRecord:
    """One GEMM: where it is, what it is, and what the policy did with it."""

    name: str          # module path, "(root)" for the top level
    node: str          # FX node name in the post-grad graph
    op: str            # mm | addmm | bmm | baddbmm
    kind: str          # linear | matmul
    shape: list        # [M, K, N] per GEMM (tokens, reduction, output features)
    batch: object      # batch count of bmm/baddbmm, 1 otherwise
    dtype: str
    rewritten: bool
    pattern: str       # "2:4", ... when rewritten, "dense" otherwise
    kernel: str        # kernel of the rewritten op, "" when dense
    norm_comp: bool
    reason: str        # why it stayed dense, "" when rewritten
    kernel_reason: str = ""  # why kernel="auto" passed over faster kernels for this node
    runtime_guard: bool = False
    min_tokens: int = 0      # the op's run-time dense threshold (a break-even M with min_tokens="auto")
    # Cost-model estimates at the compiled M (see lynx_compile/cost_model.py); None when unknown.
    est_dense_us: float | None = None
    est_sparse_us: float | None = None
    flops: int | None = None
    flops_saved: int | None = None
    break_even_m: object = None
    # With a calibration plan: what compensates this layer, and the plan's measured relative errors.
    compensation: str = ""
    plan_errors: dict | None = None
    # Who launches the kernels of a rewritten GEMM: "op" (rtlynx::sparse_matmul, from Python) or
    # "inductor" (the Triton kernels inlined into the graph); "" when dense.
    launch: str = ""
    launch_reason: str = ""  # why a Triton GEMM stays an op
    # How the GEMM was chosen (see lynx_compile/selection.py) and, when measured, the times on this device.
    selection: str = ""
    measured_dense_us: float | None = None
    measured_sparse_us: float | None = None  # the fastest sparse kernel's

    @classmethod
    def from_decision(cls, site, decision, config, cost: dict | None = None) -> "GemmRecord":
        cost = cost or {}
        return cls(
            name=site.name, node=site.node.name, op=site.op, kind=site.kind,
            shape=[_plain(site.m), _plain(site.k), _plain(site.n)], batch=_plain(site.batch),
            dtype=dtype_name(site.dtype), rewritten=decision.rewrite,
            pattern=config.pattern if decision.rewrite else "dense", kernel=decision.kernel,
            norm_comp=config.norm_comp and decision.rewrite, reason=decision.reason,
            kernel_reason=decision.kernel_reason, runtime_guard=decision.runtime_guard,
            min_tokens=decision.min_tokens, est_dense_us=cost.get("dense_us"), est_sparse_us=cost.get("sparse_us"),
            flops=cost.get("flops"), flops_saved=cost.get("flops_saved") if decision.rewrite else 0,
            break_even_m=cost.get("break_even_m"), compensation=_compensation(decision, config),
            plan_errors=dict(decision.plan_layer.errors) if decision.plan_layer is not None else None,
            selection=decision.selection, measured_dense_us=_to_us(decision.measured_dense_ms),
            measured_sparse_us=_to_us(decision.measured_sparse_ms),
        )


@dataclass
class GraphReport:
    """Everything about one compiled graph (one ``torch.compile`` graph, or one recompile)."""

    index: int
    records: list[GemmRecord]
    options: dict
    # Files for the dump folder (graph sources, repro, drawings), filled only when dump_dir is set.
    artifacts: dict = field(default_factory=dict, repr=False)

    @property
    def num_rewritten(self) -> int:
        return sum(r.rewritten for r in self.records)

    def totals(self) -> dict:
        """Share of GEMM FLOPs that runs sparse, and the cost model's speed-up of the GEMM part."""
        known = [r for r in self.records if r.est_dense_us is not None]
        flops = sum(r.flops for r in known)
        sparse_flops = sum(r.flops for r in known if r.rewritten)
        dense_us = sum(r.est_dense_us for r in known)
        lynx_us = sum(r.est_sparse_us if r.rewritten else r.est_dense_us for r in known)
        return {"gemms": len(self.records), "rewritten": self.num_rewritten,
                "sparse_flop_fraction": sparse_flops / flops if flops else 0.0,
                "est_gemm_speedup": dense_us / lynx_us if lynx_us else 1.0,
                "device_profile": self.options.get("device_profile") or "auto"}

    def summary_line(self) -> str:
        dense = len(self.records) - self.num_rewritten
        return (f"rtlynx graph {self.index}: {len(self.records)} GEMMs, {self.num_rewritten} rewritten "
                f"to {self.options['pattern']} sparse ops, {dense} dense")

    def table(self) -> str:
        rows = [
            [r.name, r.op, r.kind, "x".join(map(str, r.shape)), r.dtype, "yes" if r.rewritten else "no",
             r.pattern, r.kernel, r.compensation, _us(r.est_dense_us), _us(r.est_sparse_us) if r.rewritten else "",
             r.break_even_m if r.break_even_m is not None else "", r.reason]
            for r in self.records
        ]
        headers = ["layer", "op", "kind", "MxKxN", "dtype", "rewritten", "pattern", "kernel", "compensation",
                   "dense us", "sparse us",
                   "break-even M", "reason"]
        measured = any(r.measured_dense_us is not None for r in self.records)
        if measured:  # beside the estimates, what this device measured (selection "measured")
            for row, r in zip(rows, self.records):
                row[11:11] = [_us(r.measured_dense_us), _us(r.measured_sparse_us)]
            headers[11:11] = ["measured dense us", "measured sparse us"]
        totals = self.totals()
        footer = (f"sparse share of GEMM FLOPs: {totals['sparse_flop_fraction']:.1%}; cost-model GEMM speed-up: "
                  f"{totals['est_gemm_speedup']:.2f}x (estimates, not measurements)")
        return self.summary_line() + "\n" + tabulate(rows, headers=headers) + "\n" + footer

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        return {"graph": self.index, "options": self.options, "totals": self.totals(),
                "nodes": [asdict(r) for r in self.records]}


_REPORTS: list[GraphReport] = []
_graph_counter = itertools.count()


def next_graph_index() -> int:
    """The number of the next graph the passes see: one numbering for compile, explain and export."""
    return next(_graph_counter)


def record(report: GraphReport) -> None:
    _REPORTS.append(report)


def reports() -> list[GraphReport]:
    """Reports of every graph compiled by ``rtlynx`` in this process, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    """Forget every report, and number the next graph 0 again."""
    global _graph_counter
    _REPORTS.clear()
    _graph_counter = itertools.count()


def next_graph_dir(dump_dir: str | os.PathLike) -> Path:
    """The first free ``graph_NNN`` folder, so several graphs and recompiles never overwrite."""
    root = Path(dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    while (root / f"graph_{index:03d}").exists():
        index += 1
    path = root / f"graph_{index:03d}"
    path.mkdir()
    return path


def write_dump(report: GraphReport, dump_dir: str | os.PathLike) -> Path:
    """Write the graph's own folder, then refresh the run-wide report.{txt,json} beside it."""
    graph_dir = next_graph_dir(dump_dir)
    for name, content in report.artifacts.items():
        target = graph_dir / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    (graph_dir / "report.txt").write_text(report.table() + "\n")
    (graph_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    from .plots import report_png

    png = report_png(report)
    if png:
        (graph_dir / "report.png").write_bytes(png)
    same_dir = [r for r in _REPORTS if r.options.get("dump_dir") == report.options.get("dump_dir")]
    root = Path(dump_dir)
    (root / "report.txt").write_text("\n\n".join(r.table() for r in same_dir) + "\n")
    combined = {"graphs": [r.to_json() for r in same_dir], "nodes": [asdict(x) for r in same_dir for x in r.records]}
    (root / "report.json").write_text(json.dumps(combined, indent=2))
    return graph_dir
