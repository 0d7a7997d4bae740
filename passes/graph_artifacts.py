"""What a dump shows of a graph: readable source, a runnable repro, and drawings of rewritten regions."""

from __future__ import annotations

import torch
from torch import fx

from ..log import log
from .source_digest import source_digest


def readable(graph: fx.Graph) -> str:
    """The graph as Python with shapes, dtypes, strides and devices (``print_readable``)."""
    gm = graph.owning_module
    if gm is None:
        return str(graph)
    return gm.print_readable(print_output=False, include_stride=True, include_device=True)


def _hint(size) -> int:
    return size if isinstance(size, int) else (getattr(getattr(size, "node", None), "hint", None) or 1)


def _input_line(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        shape = [_hint(s) for s in val.shape]
        stride = [_hint(s) for s in val.stride()]
        dtype = str(val.dtype)
        maker = "torch.randn" if val.dtype.is_floating_point else "torch.zeros"
        extent = 1 + sum((d - 1) * s for d, s in zip(shape, stride) if d > 0)
        return f"{maker}({extent}, dtype={dtype}, device=DEVICE).as_strided({shape}, {stride}),  # {node.name}"
    return f"{_hint(val) if val is not None else 1},  # {node.name} (symbolic size, its compiled hint)"


def repro_source(graph: fx.Graph, title: str) -> str:
    """A standalone script that rebuilds the rewritten graph and runs it on random inputs."""
    body = graph.python_code(root_module="self").src
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = "\n        ".join(_input_line(n) for n in placeholders)
    devices = {str(n.meta["val"].device) for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)}
    device = devices.pop() if len(devices) == 1 else "cpu"
    indented = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return f'''"""Repro of {title}: the post-grad graph after the rtlynx passes, on random inputs.

Run it with `python repro.py`; `import lynx_compile` registers torch.ops.rtlynx.*.
"""
import torch
from torch import device  # noqa: F401  (the graph code may name devices)

import lynx_compile  # noqa: F401

DEVICE = {device!r}


class Repro(torch.nn.Module):
{indented}


def make_inputs():
    return [
        {inputs}
    ]


if __name__ == "__main__":
    with torch.no_grad():
        outputs = Repro()(*make_inputs())
    for out in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if isinstance(out, torch.Tensor):
            print(tuple(out.shape), out.dtype, "finite" if torch.isfinite(out).all() else "non-finite")
'''


def region_svgs(graph: fx.Graph, nodes: list[fx.Node]) -> dict[str, bytes]:
    """An SVG per rewritten node with its operands; needs pydot and graphviz (extra ``[graphs]``)."""
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer
        import pydot  # noqa: F401
    except ImportError:
        log.info("rtlynx: no SVG drawings of rewritten regions (install pydot and graphviz: pip install "
                 "'lynx-compile[graphs]')")
        return {}
    drawings = {}
    for node in nodes:
        region = fx.Graph()
        env = {}
        for arg in node.all_input_nodes:
            env[arg] = region.placeholder(arg.name)
            env[arg].meta = dict(arg.meta)
        copy = region.node_copy(node, lambda n: env[n])
        region.output(copy)
        drawer = FxGraphDrawer(fx.GraphModule(torch.nn.Module(), region), f"rtlynx_{node.name}")
        try:
            drawings[f"region_{node.name}.svg"] = drawer.get_dot_graph().create_svg()
        except Exception as error:  # graphviz's `dot` binary missing or failing
            log.info("rtlynx: could not draw %s: %s", node.name, error)
            return {}
    return drawings


class DrawRewrittenRegions:
    """Dump-only pass: an SVG of each rewritten GEMM with its operands, drawn while it is still one op.

    Input and output graph are the same; the drawings go to ``context.artifacts``.
    """

    name = "draw_rewritten_regions"

    def __call__(self, graph: fx.Graph, context) -> None:
        context.artifacts.update(region_svgs(graph, list(context.rewritten)))

    def uuid(self) -> str:
        return source_digest(__name__)
