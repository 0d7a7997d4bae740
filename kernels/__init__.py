"""Custom ops (``torch.ops.rtlynx.*``) and their kernels. Importing this registers the ops."""

from . import ops, reference
from .registry import get_kernel, kernel_names, register_kernel

__all__ = ["ops", "reference", "get_kernel", "kernel_names", "register_kernel"]
