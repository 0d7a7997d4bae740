"""``report.png``: per-layer FLOP share and decision at a glance (matplotlib, optional extra ``[plots]``)."""

from __future__ import annotations

import io

from .log import log


def report_png(report) -> bytes | None:
    """A bar per GEMM: its share of the graph's GEMM FLOPs, coloured by decision; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("rtlynx: no report.png (install matplotlib: pip install 'lynx-compile[plots]')")
        return None
    records = [r for r in report.records if r.flops]
    if not records:
        return None
    total = sum(r.flops for r in records)
    labels = [f"{r.name} ({r.op})" for r in records]
    shares = [100 * r.flops / total for r in records]
    colors = ["tab:green" if r.rewritten else "tab:gray" for r in records]
    figure, axis = plt.subplots(figsize=(9, 0.28 * len(records) + 1.2))
    axis.barh(range(len(records)), shares, color=colors)
    axis.set_yticks(range(len(records)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("share of GEMM FLOPs (%)")
    totals = report.totals()
    axis.set_title(f"{report.summary_line()}\nsparse share {totals['sparse_flop_fraction']:.1%} "
                   "(green: rewritten, grey: dense)", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
