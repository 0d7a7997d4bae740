"""The short table that ``benchmarks/device_run.sh`` prints last, from what its steps wrote.

    python benchmarks/device_summary.py OUT_DIR

It reads ``tests.xml`` (pytest's JUnit XML), ``bench_linear_*.json`` and ``bench_dit_*.json`` in
OUT_DIR, prints one table, and writes ``tests.json`` (the test counts and failures) beside them, so
that each step has a JSON.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tabulate import tabulate


def tests_summary(out: Path) -> dict | None:
    path = out / "tests.xml"
    if not path.is_file():
        return None
    suites = ET.parse(path).getroot()
    cases = list(suites.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    summary = {"tests": len(cases), "failed": len(failed), "skipped": skipped,
               "passed": len(cases) - len(failed) - skipped, "failures": failed}
    (out / "tests.json").write_text(json.dumps(summary, indent=1))
    return summary


def rows(out: Path) -> list[list]:
    table = []
    tests = tests_summary(out)
    if tests is not None:
        table.append(["tests", "gpu or triton", f"{tests['passed']} passed, {tests['failed']} failed, "
                                                f"{tests['skipped']} skipped", ""])
    for path in sorted(out.glob("bench_linear_*.json")):
        report = json.loads(path.read_text())
        for result in report["results"]:
            dense = result["routes"].get("dense", {}).get("ms")
            for route, row in result["routes"].items():
                ms = row.get("ms")
                speedup = f"{dense / ms:.2f}x" if dense and ms and route != "dense" else ""
                table.append(["linear", f"{'x'.join(map(str, result['shape']))} {route}",
                              f"{ms:.4f} ms" if ms else row.get("error", "")[:50], speedup])
    for path in sorted(out.glob("bench_dit_*.json")):
        report = json.loads(path.read_text())
        lynx = report["rtlynx"]
        table.append(["dit", f"{report['image_tokens']}+{report['text_tokens']} tokens, "
                             f"{lynx['rewritten']}/{lynx['gemms']} GEMMs sparse",
                      f"{lynx['forward_ms']:.3f} vs {report['inductor']['forward_ms']:.3f} ms",
                      f"{lynx['speedup']:.2f}x"])
    return table


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        raise SystemExit("usage: python benchmarks/device_summary.py OUT_DIR (the folder device_run.sh wrote)")
    table = rows(Path(args[0]))
    print(tabulate(table, headers=["step", "what", "result", "vs dense"]) if table else "no results found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
