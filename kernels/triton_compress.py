"""Triton N:M compress kernel: ``x (..., K) -> (values, uint8 indices, fp32 scale)``.

Bit-for-bit the same selection and output format as :func:`reference.compress` (the scale agrees
to fp32 rounding), plus an optional channel permutation applied on load, so that
``compress(x, n, m, perm=p)`` equals ``reference.compress(x[..., p], n, m)`` without materialising
``x[..., p]``.

How the kernel works (one program per block of rows, one pass over X):

* A K block is loaded as a ``[ROWS, GROUPS, M]`` tile, so every group of ``m`` lies along the
  last axis.
* Ranking key: the fp32 bit pattern of ``|x|`` read as int32. For non-negative floats this
  integer order is the float order (subnormals and +Inf included); NaN is mapped to
  ``0x7F800001``, one above +Inf, so NaN > Inf > finite and all NaNs tie, exactly as in the
  reference. ``-0.0`` and ``0.0`` share key 0.
* Rank of element ``i`` = number of group members ``j`` that beat it (``key_j > key_i``, or equal
  keys and ``j < i``: ties keep the lower index). ``m <= 8``, so that is at most 8 compares per
  element. Element ``i`` is kept when its rank is below ``n``.
* Compaction: the output slot of a kept element is the number of kept elements before it in its
  group (an exclusive cumsum), which stores kept positions in ascending order. Values are stored
  straight from the loaded tile, so NaN payloads and ``-0.0`` survive bit for bit.
* Norm compensation in the same pass: the reference divides the row by its final max ``|x|``
  before squaring (no fp16/fp32 overflow, no vanishing subnormals). Here that max is not known
  until the last K block, so the sums of squares are kept relative to the running max and
  rescaled by ``(old_max / new_max)**2`` when it grows (as online softmax does). The ratio
  ``total / kept`` does not depend on the common factor; it differs from the reference only in
  the last fp32 bits.

Arithmetic inside the kernel is fp32. bf16 is widened to fp32 by moving its bits (``<< 16``),
which is exact on every backend; the interpreter, which keeps bf16 as raw uint16 bits, mangles
subnormals in its own bf16 -> fp32 cast.

On the CPU, ``TRITON_INTERPRET=1`` runs the kernel in Triton's interpreter. Triton reads that
variable when it is imported (``torch._dynamo`` imports it), so it must be set before.

Debugging aid: with ``LYNX_TRITON_POISON=1`` in the environment, the launchers fill their outputs
with NaN (float) or 255 (uint8) before the kernel runs, so any element a kernel forgets to write
shows up in the tests.
"""

from __future__ import annotations

import math
import os

import torch

from . import contract

try:  # triton is optional: importing this module must work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

POISON_ENV = "LYNX_TRITON_POISON"
DEFAULT_BLOCK_ROWS = 16
DEFAULT_BLOCK_K = 256


if tl is not None:

    @triton.jit
    def to_f32(x):
        """Widen to fp32; bf16 by moving its bits (exact, unlike the interpreter's bf16 cast)."""
        if x.dtype == tl.bfloat16:
            y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            y = x.to(tl.float32)
        return y

    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

    # Whether triton.jit decorated this module's kernels for the CPU interpreter (TRITON_INTERPRET=1
    # when triton was imported). A constexpr global, so a kernel tests it when it is compiled: the
    # CUDA build holds only the compiled branch, with none of the interpreter's workarounds.
    INTERPRETED = tl.constexpr(isinstance(to_f32, _InterpretedFunction))

    @triton.jit
    def _compress_kernel(
        x_ptr, perm_ptr, val_ptr, idx_ptr, scale_ptr,
        R, G, stride_xr, stride_xk,
        N: tl.constexpr, M: tl.constexpr, HAS_PERM: tl.constexpr, NORM_COMP: tl.constexpr,
        PRUNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        """One program compresses BLOCK_R rows, walking K in blocks of BLOCK_G groups.

        With PRUNED, ``val_ptr`` is a dense (R, G*M) output that receives x with the dropped values
        zeroed (the layout ``torch._cslt_compress`` packs), and ``idx_ptr`` is unused.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r3 = rows.to(tl.int64)[:, None, None]                       # [BR, 1, 1]
        g_in_block = tl.arange(0, BLOCK_G)[None, :, None]           # [1, BG, 1]
        j = tl.arange(0, M)[None, None, :]                          # [1, 1, M]
        row_ok = r3 < R

        amax = tl.zeros([BLOCK_R], dtype=tl.float32)    # running max |x| over finite values
        total = tl.zeros([BLOCK_R], dtype=tl.float32)   # sum (x / amax)^2
        kept = tl.zeros([BLOCK_R], dtype=tl.float32)    # sum (kept / amax)^2
        bad = tl.zeros([BLOCK_R], dtype=tl.int32)       # row holds NaN or Inf

        for g0 in range(0, G, BLOCK_G):
            g = g0 + g_in_block
            k = g * M + j                                           # [1, BG, M] column of x[..., perm]
            mask = row_ok & (g < G)
            if HAS_PERM:
                col = tl.load(perm_ptr + k, mask=g < G, other=0).to(tl.int64)
            else:
                col = k.to(tl.int64)
            x = tl.load(x_ptr + r3 * stride_xr + col * stride_xk, mask=mask, other=0.0)
            mag = tl.abs(to_f32(x))
            key = tl.where(mag != mag, 0x7F800001, mag.to(tl.int32, bitcast=True))

            rank = tl.zeros([BLOCK_R, BLOCK_G, M], dtype=tl.int32)
            for jj in tl.static_range(M):
                key_j = tl.sum(tl.where(j == jj, key, 0), axis=2, keep_dims=True)
                beats = (key_j > key) | ((key_j == key) & (jj < j))
                rank += beats.to(tl.int32)
            keep = rank < N
            keep_i = keep.to(tl.int32)
            slot = tl.cumsum(keep_i, axis=2) - keep_i               # kept elements before this one
            if PRUNED:
                tl.store(val_ptr + r3 * (G * M) + k, tl.where(keep, x, tl.zeros_like(x)), mask=mask)
            else:
                out = r3 * (G * N) + g * N + slot
                store = mask & keep
                tl.store(val_ptr + out, x, mask=store)
                tl.store(idx_ptr + out, (j + tl.zeros_like(slot)).to(tl.uint8), mask=store)

            if NORM_COMP:
                finite = mag <= 3.4028234663852886e38               # FLT_MAX: False for NaN and Inf
                bad = tl.maximum(bad, tl.max(tl.max((~finite & mask).to(tl.int32), axis=2), axis=1))
                mag = tl.where(finite, mag, 0.0)
                new_max = tl.maximum(amax, tl.max(tl.max(mag, axis=2), axis=1))
                safe_max = tl.where(new_max > 0, new_max, 1.0)
                shrink = amax / safe_max
                q = mag / safe_max[:, None, None]
                sq = q * q
                total = total * shrink * shrink + tl.sum(tl.sum(sq, axis=2), axis=1)
                kept = kept * shrink * shrink + tl.sum(tl.sum(tl.where(keep, sq, 0.0), axis=2), axis=1)
                amax = new_max

        if NORM_COMP:
            ok = (bad == 0) & (kept > 0)
            scale = tl.where(ok, tl.sqrt(total / tl.where(ok, kept, 1.0)), 1.0)
        else:
            scale = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
        tl.store(scale_ptr + rows, scale, mask=rows < R)


def is_interpreted(fn) -> bool:
    """Whether ``fn`` was decorated while TRITON_INTERPRET=1, i.e. runs in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def triton_unavailable_reason(device_type: str) -> str:
    """"" when the Triton kernels can run on ``device_type`` now, else why they cannot."""
    if triton is None:
        return "triton is not installed (pip install 'lynx-compile[triton]')"
    if device_type == "cuda":
        return ""
    if device_type != "cpu":
        return (f"device {device_type!r} is not supported by the Triton kernels "
                "(use 'cuda', or 'cpu' with TRITON_INTERPRET=1)")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "device 'cpu' needs TRITON_INTERPRET=1 for the Triton interpreter"
    # triton.jit reads TRITON_INTERPRET when it decorates, triton's own tl.* helpers included.
    if not (is_interpreted(_compress_kernel) and is_interpreted(tl.zeros)):
        return ("TRITON_INTERPRET=1 was set after triton was imported; set it before importing "
                "triton, torch._dynamo or lynx_compile")
    return ""


def require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device.type)
    if reason:
        raise RuntimeError(f"Triton kernel cannot run: {reason}")


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or a poisoned tensor (NaN / 255) when ``LYNX_TRITON_POISON=1``."""
    if os.environ.get(POISON_ENV, "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
    return torch.full(shape, fill, dtype=dtype, device=device)


def pow2_block(size, cap: int, floor: int = 1) -> int:
    """The power of two covering ``size``, clipped to ``[floor, cap]``; ``cap`` for a symbolic size.

    A traced launch (``traceable=True``) with a dynamic dim gets the cap: comparing the SymInt here
    would add a guard, and a recompile each time the dim crosses a power of two.
    """
    if not isinstance(size, int):
        return cap
    return max(floor, min(cap, triton.next_power_of_2(max(1, size))))


def launchable(kernel, traceable: bool):
    """``kernel``, or ``wrap_triton(kernel)`` so that make_fx records its launch as a graph node.

    Traced launches are how ``rtlynx::triton_sparse_matmul`` (a ``triton_op``) lets Inductor see and
    launch the kernels. The interpreter's kernels are not traceable and run as they are.
    """
    if not traceable or is_interpreted(kernel):
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _check_perm(perm: torch.Tensor, x: torch.Tensor, check_values: bool = True) -> None:
    k = x.shape[-1]
    if perm.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"perm must be an int64 (or int32) tensor, got {perm.dtype}")
    if perm.shape != (k,):
        raise ValueError(f"perm must have shape ({k},) to permute the K={k} channels of x, got {tuple(perm.shape)}")
    if perm.device != x.device:
        raise ValueError(f"perm is on {perm.device} but x is on {x.device}")
    # One small reduction (a host sync on GPU); an out-of-range index would read out of bounds. A
    # traced launch cannot read values: its perm comes from a plan, which Plan.load checks.
    if check_values and k and (int(perm.min()) < 0 or int(perm.max()) >= k):
        raise ValueError(f"perm values must lie in [0, {k}); got [{int(perm.min())}, {int(perm.max())}]")


def compress(
    x: torch.Tensor,
    n: int,
    m: int,
    norm_comp: bool = True,
    perm: torch.Tensor | None = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_k: int = DEFAULT_BLOCK_K,
    traceable: bool = False,
):
    """Triton version of :func:`reference.compress` (same outputs), optionally on ``x[..., perm]``.

    Returns values ``(..., K*n/m)`` in x's dtype, uint8 in-group indices (ascending in each
    group) and the fp32 per-row scale ``(...)``. ``block_rows`` / ``block_k`` set the tile (rows,
    K columns); they are rounded to powers of two and capped by the problem size. x is read in
    place when its leading dims fold into rows (any row stride, any column stride). With
    ``traceable=True`` the launch goes through ``wrap_triton`` (see :func:`launchable`).
    """
    values, indices, scale = _launch(x, n, m, norm_comp, perm, block_rows, block_k, pruned=False,
                                     traceable=traceable)
    return values, indices, scale


def prune(
    x: torch.Tensor,
    n: int,
    m: int,
    norm_comp: bool = True,
    perm: torch.Tensor | None = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_k: int = DEFAULT_BLOCK_K,
    traceable: bool = False,
):
    """``(decompress(compress(x)), scale)`` in one pass: x with the dropped values zeroed, and the
    per-row scale. It is the dense 2:4 layout that ``torch._cslt_compress`` packs for cuSPARSELt."""
    pruned, _, scale = _launch(x, n, m, norm_comp, perm, block_rows, block_k, pruned=True, traceable=traceable)
    return pruned, scale


def _launch(x, n, m, norm_comp, perm, block_rows, block_k, *, pruned: bool, traceable: bool):
    contract.check_compress_inputs(x, n, m)
    if perm is not None:
        _check_perm(perm, x, check_values=not traceable)
    require_triton(x.device)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)
    rows, groups = x2.shape[0], k // m
    width = groups * m if pruned else groups * n
    values = new_output((rows, width), x.dtype, x.device)
    indices = values if pruned else new_output((rows, width), torch.uint8, x.device)
    scale = new_output((rows,), torch.float32, x.device)
    if rows:
        block_r = pow2_block(rows, block_rows)
        block_g = pow2_block(groups, max(1, block_k // m))
        launchable(_compress_kernel, traceable)[(triton.cdiv(rows, block_r),)](
            x2, perm if perm is not None else x2, values, indices, scale,
            rows, groups, x2.stride(0), x2.stride(1),
            N=n, M=m, HAS_PERM=perm is not None, NORM_COMP=bool(norm_comp), PRUNED=pruned,
            BLOCK_R=block_r, BLOCK_G=block_g,
        )
    return values.reshape(*lead, width), indices.reshape(*lead, width), scale.reshape(lead)
