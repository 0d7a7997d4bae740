"""Portable Triton sparse GEMM: ``s * S(x) @ other + (x @ lr_down) @ lr_up + bias``.

Same signature and semantics as :func:`reference.sparse_matmul` / :func:`reference.sparse_mm`:
fp32 accumulation, one rounding to x's dtype at the end.

Route: :func:`triton_compress.compress` writes (values, uint8 indices, fp32 scale); the GEMM
kernel reads that compressed A, expands each ``[BLOCK_M, BLOCK_K]`` tile back to dense in
registers and multiplies it with ``tl.dot`` into an fp32 accumulator: bf16 / fp16 tiles as they
are, on the tensor cores (``mma.sync`` on sm_80, ``wgmma`` on sm_90; the products are exact in
fp32), fp32 tiles with ``input_precision="ieee"`` (no TF32, so the fp32 path matches the reference
to fp32 rounding, on the CUDA cores). The epilogue applies the per-row scale, adds the low-rank
term ``T @ lr_up`` with a second, fp32 ``"ieee"`` ``tl.dot`` (``T = x @ lr_down`` is the small
``(M, R)`` fp32 matrix, computed beforehand with torch, as in the reference) and the bias, then
rounds once. ``tests/kernels/test_triton_tensor_cores.py`` compiles the kernel to PTX and counts
those instructions.

Interpreter notes (``triton_compress.INTERPRETED``, a constexpr, so the compiled kernel holds none
of this): the interpreter holds bf16 as raw bits, so there the main ``tl.dot`` takes both tiles
widened to fp32 by their bits (``to_f32``); and since it casts fp32 to bf16 by truncation, under it
the epilogue rounds to nearest even by hand, as the GPU conversion and torch do.

Triton has no sparse ``tl.dot``, so this kernel does dense-FLOP work on the expanded tile: it is
the portable and testable path, not the fast one (that needs mma.sp / cuSPARSELt). It reads the
compressed operand, i.e. ``n/m`` of A's values plus one byte per value of metadata.

``other`` may have any strides (``weight.t()`` is the usual, transposed, case) and may be batched
(B, K, N) with x (B, M, K); batch dims broadcast as in ``torch.matmul``. With a 2-D ``other``,
all leading dims of x are folded into the rows of one GEMM. x, other and bias share one dtype, as
in the reference; lr_down / lr_up may have any supported float dtype (they are used in fp32).
"""

from __future__ import annotations

import math

import torch

from . import contract, reference
from .triton_compress import (
    compress, is_interpreted, launchable, new_output, pow2_block, require_triton, tl, triton,
    triton_unavailable_reason,
)

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_K = 64


def gemm_launch_options(dtype: torch.dtype) -> dict:
    """Triton compile options for the GEMM kernel on ``dtype`` operands.

    GPUs of compute capability 8.6 and 8.9 (RTX 30 and 40 series, A10, L4) give a block at most
    99 KB of shared memory. With Triton's default of 3 pipeline stages, the fp32 64x64x64 tiles need
    112 KB and the launch fails there; 2 stages need 64 KB. ``tests/test_triton_aot.py`` compiles the
    kernels for those GPUs on the CPU and checks the shared memory of each dtype.
    """
    return {"num_stages": 2} if dtype == torch.float32 else {}


def unavailable_reason(device_type: str, dtype: torch.dtype, shape: tuple) -> str:
    """"" when this kernel can run for (device type, dtype, (M, K, N)), else the reason.

    The shape never rules it out: any M, N and any K divisible by the pattern's M work.
    """
    reason = triton_unavailable_reason(device_type)
    if reason:
        return reason
    if dtype not in contract.SUPPORTED_DTYPES:
        valid = ", ".join(contract.DTYPES)
        return f"dtype {dtype} is not supported by the Triton sparse GEMM; supported dtypes: {valid}"
    return ""


if tl is not None:
    from .triton_compress import INTERPRETED, to_f32

    @triton.jit
    def _sparse_mm_kernel(
        val_ptr, idx_ptr, scale_ptr, b_ptr, t_ptr, u_ptr, bias_ptr, out_ptr,
        M, N, K, RANK,
        s_vb, s_vm, s_vk, s_ib, s_im, s_ik, s_sb, s_sm,
        s_bb, s_bk, s_bn, s_tb, s_tm, s_tr, s_ub, s_ur, s_un,
        s_cb, s_cm, s_cn, s_ob, s_om, s_on,
        NS: tl.constexpr, MS: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
        BF16_RNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """One program computes a [BLOCK_M, BLOCK_N] output tile of batch program_id(2)."""
        batch = tl.program_id(2).to(tl.int64)
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = rm[:, None] < M
        n_ok = rn[None, :] < N
        val_rows = val_ptr + batch * s_vb + rm[:, None] * s_vm
        idx_rows = idx_ptr + batch * s_ib + rm[:, None] * s_im

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)              # dense columns; BLOCK_K % MS == 0
            a_ok = m_ok & (k[None, :] < K)
            group = k // MS
            pos = (k % MS)[None, :]
            # Expand the compressed tile: column k takes the kept value of its group whose stored
            # index is k % MS, else 0. Each of the NS slots is gathered for every column of its
            # group (re-reads that hit the cache), and `where` copies the value without arithmetic.
            a = tl.zeros([BLOCK_M, BLOCK_K], dtype=val_ptr.dtype.element_ty)
            for slot in tl.static_range(NS):
                ck = (group * NS + slot)[None, :]
                v = tl.load(val_rows + ck * s_vk, mask=a_ok, other=0.0)
                i = tl.load(idx_rows + ck * s_ik, mask=a_ok, other=0)
                a = tl.where(i.to(tl.int32) == pos, v, a)
            b = tl.load(b_ptr + batch * s_bb + k[:, None] * s_bk + rn[None, :] * s_bn,
                        mask=(k[:, None] < K) & n_ok, other=0.0)
            if INTERPRETED:  # the interpreter holds bf16 as raw bits: multiply the widened tiles
                acc = tl.dot(to_f32(a), to_f32(b), acc, input_precision="ieee")
            else:  # bf16 / fp16 on the tensor cores into the fp32 acc; fp32 stays exact (no TF32)
                acc = tl.dot(a, b, acc, input_precision="ieee")

        scale = tl.load(scale_ptr + batch * s_sb + rm * s_sm, mask=rm < M, other=1.0)
        acc = acc * scale[:, None]
        if HAS_LR:  # low-rank compensation (x @ lr_down) @ lr_up, accumulated in the epilogue
            lr = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for r0 in range(0, RANK, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                t = tl.load(t_ptr + batch * s_tb + rm[:, None] * s_tm + r[None, :] * s_tr,
                            mask=m_ok & (r[None, :] < RANK), other=0.0)
                u = tl.load(u_ptr + batch * s_ub + r[:, None] * s_ur + rn[None, :] * s_un,
                            mask=(r[:, None] < RANK) & n_ok, other=0.0)
                lr = tl.dot(to_f32(t), to_f32(u), lr, input_precision="ieee")
            acc = acc + lr
        if HAS_BIAS:
            bias = tl.load(bias_ptr + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn,
                           mask=m_ok & n_ok, other=0.0)
            acc = acc + to_f32(bias)
        if BF16_RNE:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            res = tl.where(acc != acc, 0x7FC0, bits).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            res = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + batch * s_ob + rm[:, None] * s_om + rn[None, :] * s_on, res, mask=m_ok & n_ok)


def permute_rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t.index_select(-2, perm)`` as a gather, which traces on fake CUDA tensors in a CPU-only torch
    (the tests' case; index_select decomposes to indexing, which needs a CUDA build there)."""
    return t.gather(-2, perm.unsqueeze(-1).expand(t.shape))


def _expand(t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    try:
        return t.expand(shape)
    except RuntimeError as err:
        raise ValueError(f"{what} of shape {tuple(t.shape)} does not broadcast to {tuple(shape)}") from err


def _flat(t: torch.Tensor, batch: tuple, tail: tuple, what: str) -> torch.Tensor:
    """Broadcast ``t`` to ``(*batch, *tail)`` and fold the batch dims into one: ``(B, *tail)``.

    Broadcast dims get stride 0, so this is a view (no copy) in the usual cases.
    """
    return _expand(t, (*batch, *tail), what).reshape(math.prod(batch), *tail)


def _check_compressed(values, indices, scale, other, bias, n, m) -> None:
    """The checks of :func:`reference.sparse_mm`, plus the layout the kernel relies on."""
    contract.check_sparse_mm_inputs(values, indices, scale, other, bias, n, m)
    if values.shape[-1] % n != 0:
        raise ValueError(f"compressed dim {values.shape[-1]} is not a multiple of N={n}")


def _gemm(values, indices, scale, other, bias, t, lr_up, *, n, m, block_m, block_n, block_k, traceable=False):
    """Launch the GEMM on checked, compressed A; ``t`` is ``x @ lr_down`` in fp32 (or None)."""
    require_triton(values.device)
    kc = values.shape[-1]
    k, n_out = kc // n * m, other.shape[-1]
    rank = t.shape[-1] if t is not None else 0
    if t is not None and lr_up.shape[-2] != rank:
        raise ValueError(f"lr_down has rank {rank} but lr_up has {lr_up.shape[-2]} rows (expected (R, N))")

    dims = [values.shape[:-2], other.shape[:-2]] + ([t.shape[:-2], lr_up.shape[:-2]] if t is not None else [])
    batch = torch.broadcast_shapes(*dims)
    out_shape = (*batch, values.shape[-2], n_out)
    fold = other.dim() == 2 and (t is None or (lr_up.dim() == 2 and t.shape[:-1] == values.shape[:-1]))
    if fold:  # one GEMM over all rows of x
        rows = math.prod(values.shape[:-1])
        values, indices = values.reshape(rows, kc), indices.reshape(rows, kc)
        scale = scale.reshape(rows)
        t = t.reshape(rows, rank) if t is not None else None
        bias = _expand(bias, out_shape, "bias").reshape(rows, n_out) if bias is not None else None
        batch, mr = (), rows
    else:
        mr = values.shape[-2]
    v3 = _flat(values, batch, (mr, kc), "values")
    i3 = _flat(indices, batch, (mr, kc), "indices")
    s2 = _flat(scale, batch, (mr,), "scale")
    b3 = _flat(other, batch, (k, n_out), "other")
    t3 = _flat(t, batch, (mr, rank), "x @ lr_down") if t is not None else None
    u3 = _flat(lr_up, batch, (rank, n_out), "lr_up") if t is not None else None
    c3 = _flat(bias, batch, (mr, n_out), "bias") if bias is not None else None
    nb = v3.shape[0]
    out = new_output((nb, mr, n_out), values.dtype, values.device)

    if nb and mr and n_out:
        # tl.dot needs every block dim >= 16; BLOCK_K >= 16 is a multiple of m (2, 4 or 8).
        bm, bn = pow2_block(mr, block_m, 16), pow2_block(n_out, block_n, 16)
        bk, br = pow2_block(k, block_k, 16), pow2_block(rank, 64, 16)
        zeros3 = (0, 0, 0)
        grid = (triton.cdiv(mr, bm), triton.cdiv(n_out, bn), nb)
        launchable(_sparse_mm_kernel, traceable)[grid](
            v3, i3, s2, b3,
            t3 if t3 is not None else out, u3 if u3 is not None else out, c3 if c3 is not None else out, out,
            mr, n_out, k, rank,
            *v3.stride(), *i3.stride(), *s2.stride(), *b3.stride(),
            *(t3.stride() if t3 is not None else zeros3), *(u3.stride() if u3 is not None else zeros3),
            *(c3.stride() if c3 is not None else zeros3), *out.stride(),
            NS=n, MS=m, HAS_LR=t3 is not None, HAS_BIAS=c3 is not None,
            BF16_RNE=out.dtype == torch.bfloat16 and is_interpreted(_sparse_mm_kernel),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, **gemm_launch_options(out.dtype),
        )
    return out.reshape(out_shape)


def sparse_mm(values, indices, scale, other, bias=None, *, n: int, m: int,
              block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
              block_k: int = DEFAULT_BLOCK_K) -> torch.Tensor:
    """Triton :func:`reference.sparse_mm`: ``scale * (S(x) @ other) + bias`` from compressed x."""
    _check_compressed(values, indices, scale, other, bias, n, m)
    return _gemm(values, indices, scale, other, bias, None, None, n=n, m=m,
                 block_m=block_m, block_n=block_n, block_k=block_k)


def sparse_matmul(
    x: torch.Tensor,
    other: torch.Tensor,
    bias: torch.Tensor | None = None,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    *,
    n: int,
    m: int,
    norm_comp: bool = True,
    min_tokens: int = 0,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    perm: torch.Tensor | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """Triton :func:`reference.sparse_matmul`: ``s * S(x) @ other + (x @ lr_down) @ lr_up + bias``.

    ``other`` is (K, N) or (B, K, N), any strides; rows fewer than ``min_tokens`` take the exact
    dense torch path, as in the reference. ``x @ lr_down`` (M x R, R small) is computed in fp32
    with torch, and its product with ``lr_up`` is accumulated in the GEMM's epilogue. With ``perm``,
    the groups are formed over ``x[..., perm]``, gathered as the compress kernel loads x (``other``
    and ``lr_down`` must already be in that order). ``traceable`` launches through ``wrap_triton``.
    """
    contract.check_sparse_matmul_args(x, other, bias, lr_down, lr_up, n, m)
    if x.shape[-2] < min_tokens:
        return reference.dense_matmul(x, other, bias)
    values, indices, scale = compress(x, n, m, norm_comp, perm, traceable=traceable)
    if perm is not None and lr_down is not None:  # x @ lr_down[perm^-1] == x[..., perm] @ lr_down
        lr_down = permute_rows(lr_down, torch.argsort(perm))
    t = torch.matmul(x.float(), lr_down.float()) if lr_down is not None else None
    return _gemm(values, indices, scale, other, bias, t, lr_up, n=n, m=m,
                 block_m=block_m, block_n=block_n, block_k=block_k, traceable=traceable)
