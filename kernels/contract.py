"""The contract of the ``rtlynx::*`` ops: what they accept, and the one check of each input.

One place for the supported N:M patterns, dtypes and devices, read by the options (``config``), the
policy, calibration and plans alike, and for the input checks that the ops, their fake
implementations and every kernel run, so that every route rejects bad input with the same message.
The numerical ground truth lives apart, in ``reference.py``.
"""

from __future__ import annotations

import torch

# In the order the options list them (2:4 first: the pattern of sparse tensor cores).
PATTERN_NAMES = ("2:4", "1:2", "4:8")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUPPORTED_DTYPES = tuple(DTYPES.values())
DEVICES = ("cpu", "cuda")


def parse_pattern(name: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; anything but a supported pattern is an error that lists them."""
    if name not in PATTERN_NAMES:
        raise ValueError(f"unsupported N:M pattern {name!r}; valid patterns: {', '.join(PATTERN_NAMES)}")
    n, m = name.split(":")
    return int(n), int(m)


SUPPORTED_PATTERNS = tuple(parse_pattern(name) for name in PATTERN_NAMES)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as reports, plans and messages spell dtypes."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; supported dtypes: {', '.join(DTYPES)}") from None


def gemm_dtype_reason(x_dtype: torch.dtype, other_dtype: torch.dtype, bias_dtype: torch.dtype | None = None) -> str:
    """Why a GEMM with these operand dtypes cannot be rewritten ("" when it can).

    Every operand counts: the ops need one supported dtype for x, the weight and the bias, as addmm
    does, so an int8 input with fp32 weights stays as it is and fails where eager would.
    """
    operands = {"x": x_dtype, "other": other_dtype, "bias": bias_dtype}
    for dtype in operands.values():
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype_name(dtype)} unsupported (supported: {', '.join(DTYPES)})"
    if len({d for d in operands.values() if d is not None}) > 1:
        return "operand dtypes differ: " + ", ".join(f"{what} is {dtype_name(d)}" for what, d in operands.items()
                                                     if d is not None)
    return ""


def device_reason(device: torch.device) -> str:
    """Why the ops cannot run on this device ("" when they can)."""
    if device.type not in DEVICES:
        return f"device {device.type!r} unsupported (supported: {', '.join(DEVICES)})"
    return ""


def reduction_dim_reason(k, m: int) -> str:
    """Why a GEMM with reduction dim K cannot take groups of M ("" when it can)."""
    if not isinstance(k, int):
        return f"reduction dim K={k} is dynamic"
    if k % m:
        return f"K={k} is not divisible by M={m}"
    return ""


def check_pattern(n: int, m: int) -> None:
    if (n, m) not in SUPPORTED_PATTERNS:
        raise ValueError(f"unsupported N:M pattern {n}:{m}; valid patterns: {', '.join(PATTERN_NAMES)}")


def check_operand(x: torch.Tensor, m: int, what: str = "x") -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} has unsupported dtype {x.dtype}; supported dtypes: {', '.join(DTYPES)}")
    if x.dim() < 1:
        raise ValueError(f"{what} must have at least one dimension (the reduction dim K)")
    if x.shape[-1] % m != 0:
        raise ValueError(f"{what}: reduction dim K={x.shape[-1]} is not divisible by M={m}")


def check_same_dtype(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """One dtype for every GEMM operand, as addmm requires; no silent promotion."""
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; rtlynx ops need one dtype for "
                            f"x, other and bias")


def check_reduction_dims(x: torch.Tensor, other: torch.Tensor, k: int) -> None:
    if x.dim() < 2 or other.dim() < 2:
        raise ValueError(f"expected x and other with at least 2 dims, got {x.dim()} and {other.dim()}")
    if k != other.shape[-2]:
        raise ValueError(f"reduction dims differ: x has K={k}, other has K={other.shape[-2]}")


def compensation_error(k, n, lr_down, lr_up, perm, bias_delta, bias_name: str = "comp_bias") -> str:
    """What is wrong with a layer's compensation tensors for a (K, N) GEMM ("" when nothing is).

    The one shape rule for the ops' inputs and for calibration plans on disk.
    """
    if (lr_down is None) != (lr_up is None):
        return "lr_down and lr_up must be given together (low-rank compensation)"
    if lr_down is not None and (lr_down.dim() != 2 or lr_up.dim() != 2 or lr_down.shape[0] != k
                                or lr_up.shape[0] != lr_down.shape[1] or lr_up.shape[1] != n):
        return (f"lr_down must be (K={k}, R) and lr_up (R, N={n}), got {tuple(lr_down.shape)} and "
                f"{tuple(lr_up.shape)}")
    if perm is not None and (perm.dtype != torch.int64 or tuple(perm.shape) != (k,)):
        return f"perm must be int64 of shape (K={k},), got {perm.dtype} {tuple(perm.shape)}"
    if bias_delta is not None and (bias_delta.dtype != torch.float32 or tuple(bias_delta.shape) != (n,)):
        return f"{bias_name} must be float32 of shape (N={n},), got {bias_delta.dtype} {tuple(bias_delta.shape)}"
    return ""


def check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n: int, m: int) -> None:
    """Every kernel's ``sparse_matmul`` accepts exactly the same inputs, and rejects the rest alike."""
    check_pattern(n, m)
    check_operand(x, m)
    check_operand(other, 1, "other")
    check_same_dtype(x, other=other, bias=bias)
    check_reduction_dims(x, other, x.shape[-1])
    error = compensation_error(x.shape[-1], other.shape[-1], lr_down, lr_up, None, None)
    if error:
        raise ValueError(error)


def check_layer_inputs(x, other, bias, lr_down, lr_up, perm, comp_bias, n: int, m: int) -> None:
    """Every input of the fused layer (``rtlynx::sparse_matmul`` and ``rtlynx::triton_sparse_matmul``)."""
    check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n, m)
    error = compensation_error(x.shape[-1], other.shape[-1], None, None, perm, comp_bias)
    if error:
        raise ValueError(error)


def check_compress_inputs(x: torch.Tensor, n: int, m: int) -> None:
    """The input of ``compress``: a supported pattern, and x's K divisible by M."""
    check_pattern(n, m)
    check_operand(x, m)


def check_compressed(values, indices, scale) -> None:
    """The output of ``compress`` as ``sparse_mm`` takes it."""
    if indices.dtype != torch.uint8 or indices.shape != values.shape:
        raise ValueError(f"indices must be uint8 of the values' shape {tuple(values.shape)}, got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if scale.dtype != torch.float32 or scale.shape != values.shape[:-1]:
        raise ValueError(f"scale must be float32 of shape {tuple(values.shape[:-1])}, got {scale.dtype} "
                         f"{tuple(scale.shape)}")


def check_sparse_mm_inputs(values, indices, scale, other, bias, n: int, m: int) -> None:
    """Every input of ``sparse_mm``: compressed x as ``compress`` returns it, and a matching ``other``."""
    check_pattern(n, m)
    check_operand(values, 1, "values")
    check_compressed(values, indices, scale)
    check_operand(other, 1, "other")
    check_same_dtype(values, other=other, bias=bias)
    check_reduction_dims(values, other, values.shape[-1] // n * m)
