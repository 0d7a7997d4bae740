"""Static instruction counts of the fused kernel's main loop, from its SASS (no GPU needed).

    python benchmarks/sass_counts.py                 # the default targets, table + JSON
    python benchmarks/sass_counts.py --targets sm_90:bfloat16:128x256x3,sm_90:bfloat16:128x256x4-wgmma --out /tmp

The fused kernel is built with NVRTC (``kernels/fused_cuda.py``) and disassembled with ``cuobjdump``
(the one that ships with Triton's NVIDIA backend, or $CUOBJDUMP, or one on PATH). The main loop is
the innermost loop that holds the sparse MMAs (``HMMA.SP``, or ``HGMMA.SP`` for the wgmma build): from its first instruction to its
backward branch. Three builds per target:
  kernel        the kernel as it runs (its loop includes the rare NaN/Inf and rescaling branches)
  common_path   the rare branches compiled out: the instructions a K tile of finite data costs
  no_selection  selection and statistics compiled out: copies, stores and products only
common_path minus no_selection is the compression's cost. Each SM scheduler issues for 2 of the 8
warps, so a K tile needs at least 2 x (common_path loop) issue cycles per scheduler: the number to
set against the tensor cores' time for the same tile (benchmarks/NOTES.md).

These counts predict; only a GPU run measures (bench_linear.py).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from lynx_compile.kernels import cuda_rtc, fused_cuda
from lynx_compile.kernels.contract import dtype_name

DEFAULT_TARGETS = ("sm_90:bfloat16:128x256x4-wgmma", "sm_90:bfloat16:128x256x4-wgmma-c2", "sm_90:bfloat16:128x256x3", "sm_90:float16:128x256x3",
                   "sm_80:bfloat16:128x128x3")
VARIANTS = ("kernel", "common_path", "no_selection")
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def cuobjdump() -> str | None:
    """Path of a cuobjdump, or None."""
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str   # with modifiers, e.g. HMMA.SP.16832.F32.BF16
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def branch_target(self) -> int | None:
        if self.base != "BRA":
            return None
        match = _BRANCH_TARGET.search(self.operands)
        return int(match.group(1), 16) if match else None


def cuobjdump_version() -> str:
    tool = cuobjdump()
    if tool is None:
        return "none"
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


def disassemble(cubin: bytes) -> list[Instruction]:
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump found (set $CUOBJDUMP, put one on PATH, or install triton)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool, "--dump-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return [Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip())
            for m in map(_LINE.match, sass.splitlines()) if m]


SPARSE_MMA = ("HMMA.SP", "HGMMA.SP")  # mma.sp (warp) and wgmma.mma_async.sp (warpgroup)


def main_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The smallest loop (a backward branch and its target) that contains a sparse MMA."""
    addresses = [i.address for i in instructions]
    best = None
    for end, ins in enumerate(instructions):
        target = ins.branch_target()
        if target is None or target > ins.address or target not in addresses:
            continue
        start = addresses.index(target)
        body = instructions[start:end + 1]
        if any(i.opcode.startswith(SPARSE_MMA) for i in body) and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        raise ValueError("no loop with sparse MMA instructions (HMMA.SP, HGMMA.SP) in this SASS")
    return best


def loop_counts(instructions: list[Instruction]) -> dict:
    loop = main_loop(instructions)
    opcodes = collections.Counter(i.base for i in loop)
    return {
        "loop_instructions": len(loop),
        "hmma_sp": sum(i.opcode.startswith("HMMA.SP") for i in loop),
        "hgmma_sp": sum(i.opcode.startswith("HGMMA.SP") for i in loop),
        "barriers": opcodes["BAR"],
        "branches": opcodes["BRA"],   # the back edge is one of them
        "opcodes": dict(opcodes.most_common()),
    }


def skipped_block(loop: list[Instruction]) -> int:
    """Instructions of the loop's longest forward branch: in the cluster build, the compression that
    warps 4-7 jump over (0 when the loop has no forward branch, as on the common path of the others)."""
    addresses = [i.address for i in loop]
    skips = [addresses.index(i.branch_target()) - n - 1 for n, i in enumerate(loop[:-1])
             if i.branch_target() is not None and i.branch_target() in addresses and i.branch_target() > i.address]
    return max(skips, default=0)


def issue_per_scheduler(loop: list[Instruction]) -> int:
    """Issue slots per SM scheduler per K tile on the common path: each scheduler runs 2 of the 8 warps,
    both through the whole loop, or in the cluster build one compressing warp and one that skips it."""
    return 2 * len(loop) - skipped_block(loop)


def parse_target(text: str) -> tuple[str, torch.dtype, fused_cuda.TileConfig]:
    try:
        arch, dtype_name, name = text.split(":")
        tiles, *suffixes = name.lower().split("-")
        bm, bn, stages = (int(v) for v in tiles.split("x"))
        mainloop = suffixes[0] if suffixes else "mma"
        cluster = int(suffixes[1].removeprefix("c")) if len(suffixes) > 1 else 1
        if len(suffixes) > 2 or (len(suffixes) > 1 and not suffixes[1].startswith("c")):
            raise ValueError(name)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
        return arch, dtype, fused_cuda.TileConfig(bm, bn, stages, mainloop, cluster)
    except (ValueError, KeyError):
        raise SystemExit(f"sass_counts: target {text!r} is not arch:dtype:BMxBNxSTAGES[-wgmma[-c2]], "
                         "e.g. sm_90:bfloat16:128x256x3 (dtype bfloat16 or float16)") from None


def count_target(arch: str, dtype: torch.dtype, config: fused_cuda.TileConfig) -> dict:
    row = {"arch": config.arch(arch), "dtype": dtype_name(dtype), "tile": config.name}
    for variant in VARIANTS:
        built = fused_cuda.build(arch, dtype, config, use_cache=False, variant=variant)
        instructions = disassemble(built.cubin)
        if variant == "kernel":
            row["registers"] = int(re.search(r"Used (\d+) registers", built.log).group(1))
            row["spill_bytes"] = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", built.log))
        if variant == "common_path":
            row["issue_per_scheduler"] = issue_per_scheduler(main_loop(instructions))
        row[variant] = loop_counts(instructions)
    row["compression_instructions"] = (row["common_path"]["loop_instructions"]
                                       - row["no_selection"]["loop_instructions"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated arch:dtype:BMxBNxSTAGES")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    targets = [parse_target(t) for t in args.targets.split(",")]
    rows = [count_target(*target) for target in targets]
    table = [[r["arch"], r["dtype"], r["tile"], r["registers"], r["spill_bytes"], r["kernel"]["loop_instructions"],
              r["common_path"]["loop_instructions"], r["no_selection"]["loop_instructions"],
              r["compression_instructions"], r["common_path"]["hmma_sp"] + r["common_path"]["hgmma_sp"],
              r["common_path"]["barriers"],
              r["common_path"]["branches"], r["issue_per_scheduler"]] for r in rows]
    headers = ["arch", "dtype", "tile", "regs", "spill B", "loop (kernel)", "loop (common path)",
               "loop (no selection)", "compression", "sparse MMA", "BAR", "BRA", "issue/scheduler"]
    print("Fused kernel main loop, instructions per thread per K tile of 64 (static SASS):")
    print(tabulate(table, headers=headers))
    date = datetime.date.today().isoformat()
    report = {"date": date, "nvrtc": ".".join(map(str, cuda_rtc.nvrtc_version())), "cuobjdump": cuobjdump_version(),
              "what": "static SASS counts of the fused kernel's main loop, per thread per K tile", "targets": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sass_counts_{date}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
