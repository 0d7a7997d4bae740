"""``lynx-compile`` / ``python -m lynx_compile``: inspect options and dumps from the shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tabulate import tabulate

from . import config as config_module
from .config import LynxConfig
from .cost_model import PROFILES

_CHOICES = {
    "pattern": config_module.PATTERNS, "op_kinds": config_module.OP_KINDS, "kernel": config_module.KERNELS,
    "inner": config_module.INNER_COMPILERS, "mode": config_module.MODES, "device_profile": tuple(PROFILES),
    "selection": config_module.SELECTIONS,
}


def _options_table() -> str:
    rows = [[f.name, repr(f.default), ", ".join(map(repr, _CHOICES.get(f.name, ()))) or "-"]
            for f in dataclasses.fields(LynxConfig) if not f.metadata.get("internal")]
    return tabulate(rows, headers=["option", "default", "choices"])


def _report_table(dump_dir: Path) -> str:
    path = dump_dir / "report.json" if dump_dir.is_dir() else dump_dir
    if not path.is_file():
        raise SystemExit(f"lynx-compile: no report.json at {path}")
    nodes = json.loads(path.read_text())["nodes"]
    rows = [[n["name"], n["op"], "x".join(map(str, n["shape"])), n["dtype"], "yes" if n["rewritten"] else "no",
             n["pattern"], n["kernel"], n["reason"]] for n in nodes]
    rewritten = sum(n["rewritten"] for n in nodes)
    return (f"{len(nodes)} GEMMs, {rewritten} rewritten, {len(nodes) - rewritten} dense\n"
            + tabulate(rows, headers=["layer", "op", "MxKxN", "dtype", "rewritten", "pattern", "kernel", "reason"]))


def _load_builder(spec: str):
    """``path/to/file.py:function`` or ``package.module:function``."""
    import importlib
    import importlib.util

    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise SystemExit(f"lynx-compile: expected FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("lynx_explain_target", target)
        if module_spec is None or not Path(target).is_file():
            raise SystemExit(f"lynx-compile: no such file {target!r}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise SystemExit(f"lynx-compile: {target!r} has no function {name!r}")
    return getattr(module, name)


def _explain(spec: str, options_json: str, json_path: Path | None) -> str:
    import torch

    from .explain import explain

    built = _load_builder(spec)()
    model, args, kwargs = (*built, {}) if len(built) == 2 else built
    with torch.no_grad():
        explanation = explain(model, *args, options=json.loads(options_json), **kwargs)
    if json_path:
        json_path.write_text(explanation.dumps())
    return str(explanation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lynx-compile", description="Inspect the rtlynx backend.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("options", help="list every backend option with its default and choices")
    show = sub.add_parser("show", help="print the per-GEMM table of a dump_dir (or a report.json)")
    show.add_argument("path", type=Path)
    explain_cmd = sub.add_parser("explain", help="dry run: what rtlynx would do to a model, without compiling")
    explain_cmd.add_argument("builder", help="FILE.py:FUNCTION or MODULE:FUNCTION returning (model, args[, kwargs])")
    explain_cmd.add_argument("--options", default="{}", help="backend options as JSON")
    explain_cmd.add_argument("--json", type=Path, help="also write the explanation as JSON here")
    demo = sub.add_parser("demo", help="sample the shipped MNIST DiT dense and through rtlynx; report, quality, PNG")
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main_from_args

        return main_from_args(args)
    if args.command == "options":
        print(_options_table())
    elif args.command == "show":
        print(_report_table(args.path))
    else:
        print(_explain(args.builder, args.options, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
