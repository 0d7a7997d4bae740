"""The source a pass depends on, found through imports: the code part of its Inductor cache key.

Inductor's FX graph cache reuses a compiled graph when the pass's ``uuid`` is unchanged, so the uuid
must change whenever any code that decides what the pass writes changes: the pass, the policy, the
options, the cost model, the ops and the kernels it inlines. Starting from the pass's own module,
this follows every ``import`` (module level or inside functions) into this package, read from the
source with ``ast``, and hashes each module's file under its module name. It reads modules where
Python finds them, so an editable checkout and an installed wheel give the same digest.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util

PACKAGE = __name__.split(".")[0]  # "lynx_compile", however this file was laid out on disk


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _is_module(name: str) -> bool:
    spec = _spec(name)
    return spec is not None and spec.origin is not None and spec.origin.endswith(".py")


def _imported_modules(name: str) -> set[str]:
    """The modules of this package that ``name``'s source imports, directly or by ``from`` import."""
    spec = _spec(name)
    tree = ast.parse(open(spec.origin, encoding="utf-8").read(), filename=spec.origin)
    package = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # ``from pkg import mod`` imports a module; ``from mod import f`` its module
                found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return {module for module in found if module.split(".")[0] == PACKAGE and _is_module(module)}


@functools.cache
def module_closure(root: str) -> tuple[str, ...]:
    """``root`` and every module of this package it imports, transitively, sorted by name."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imported_modules(name) - seen)
    return tuple(sorted(seen))


@functools.cache
def source_digest(root: str) -> str:
    """sha256 over (module name, source bytes) of ``module_closure(root)``."""
    digest = hashlib.sha256()
    for name in module_closure(root):
        digest.update(name.encode() + b"\0")
        with open(_spec(name).origin, "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()
