"""Forward hooks for one replay of the model: every stage of calibration watches layers this way.

``forward_hooks`` registers a list of hooks and removes them all when the block ends, even when the
replay raises, so that no stage leaves a hook behind on the caller's model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import Tensor, nn


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]], *, with_kwargs: bool = False) -> Iterator[None]:
    """Register ``module.register_forward_hook(hook)`` for each ``(module, hook)`` pair, in order (a
    module may appear more than once), for the duration of the block."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


def layer_input(args: tuple, kwargs: dict) -> Tensor:
    """The input of an ``nn.Linear`` call as a ``with_kwargs`` forward hook sees it."""
    return args[0] if args else kwargs["input"]


def _flat_input(args: tuple, kwargs: dict) -> Tensor:
    """The same input as rows (tokens x K)."""
    x = layer_input(args, kwargs)
    return x.reshape(-1, x.shape[-1])
