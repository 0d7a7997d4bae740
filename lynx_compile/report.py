"""What the passes did, per GEMM and per compiled graph: in memory, as tables and as files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate


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

    @classmethod
    def from_decision(cls, site, decision, config) -> "GemmRecord":
        return cls(
            name=site.name, node=site.node.name, op=site.op, kind=site.kind,
            shape=[_plain(site.m), _plain(site.k), _plain(site.n)], batch=_plain(site.batch),
            dtype=str(site.dtype).removeprefix("torch."), rewritten=decision.rewrite,
            pattern=config.pattern if decision.rewrite else "dense", kernel=decision.kernel,
            norm_comp=config.norm_comp and decision.rewrite, reason=decision.reason,
            kernel_reason=decision.kernel_reason, runtime_guard=decision.runtime_guard,
        )


@dataclass
class GraphReport:
    """Everything about one compiled graph (one ``torch.compile`` graph, or one recompile)."""

    index: int
    records: list[GemmRecord]
    options: dict
    graph_before: str = field(default="", repr=False)
    graph_after: str = field(default="", repr=False)

    @property
    def num_rewritten(self) -> int:
        return sum(r.rewritten for r in self.records)

    def summary_line(self) -> str:
        dense = len(self.records) - self.num_rewritten
        return (f"rtlynx graph {self.index}: {len(self.records)} GEMMs, {self.num_rewritten} rewritten "
                f"to {self.options['pattern']} sparse ops, {dense} dense")

    def table(self) -> str:
        rows = [
            [r.name, r.op, r.kind, "x".join(map(str, r.shape)), r.dtype, "yes" if r.rewritten else "no",
             r.pattern, r.kernel, r.reason]
            for r in self.records
        ]
        headers = ["layer", "op", "kind", "MxKxN", "dtype", "rewritten", "pattern", "kernel", "reason"]
        return self.summary_line() + "\n" + tabulate(rows, headers=headers)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        return {"graph": self.index, "options": self.options, "nodes": [asdict(r) for r in self.records]}


_REPORTS: list[GraphReport] = []


def record(report: GraphReport) -> None:
    _REPORTS.append(report)


def reports() -> list[GraphReport]:
    """Reports of every graph compiled by ``rtlynx`` in this process, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


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
    (graph_dir / "graph_before.py").write_text(report.graph_before)
    (graph_dir / "graph_after.py").write_text(report.graph_after)
    (graph_dir / "report.txt").write_text(report.table() + "\n")
    (graph_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    same_dir = [r for r in _REPORTS if r.options.get("dump_dir") == report.options.get("dump_dir")]
    root = Path(dump_dir)
    (root / "report.txt").write_text("\n\n".join(r.table() for r in same_dir) + "\n")
    combined = {"graphs": [r.to_json() for r in same_dir], "nodes": [asdict(x) for r in same_dir for x in r.records]}
    (root / "report.json").write_text(json.dumps(combined, indent=2))
    return graph_dir
