"""Triton forward kernel for position-remapped attention (Self-Extend, dual-chunk).

Entry point: :func:`remap_attention_triton`, with the signature and result of
``kernels.reference_remap.remap_attention`` (the oracle; read its docstring for the rule). Shapes:
``query`` (B, H, Sq, D) post-RoPE, ``key``/``value`` (B, H_kv, Skv, D) with H = G * H_kv (GQA in the
kernel, K/V never repeated); queries are the LAST Sq of the Skv positions (prefill, chunked prefill,
decode). The result is (B, H, Sq, D) in ``query.dtype``, laid out as (B, Sq, H, D) in memory so that
``out.transpose(1, 2)`` is contiguous for free.

One program per (query block, batch * head) visits the causal key blocks with an online softmax (exp2).
Per tile it computes two score matrices: the *near* branch from q and k as given (true positions) and the
*far* branch from q and k rotated in registers by (far position - true position), in the rotate-half
convention on the first 2 * len(inv_freq) channels; the scheme's near/far rule picks one per (query, key).
Rotated operands are cast back to the input dtype for the tensor-core product (float32 inputs use IEEE
products). Logical positions, padding and packed-sequence ids come from the host as (B, Skv) tensors.
Forward only (inference); training through it would need a backward kernel.

This module imports without a GPU: triton is imported under a guard; kernels are launched for CUDA
tensors, or for CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
"""

from __future__ import annotations

import os

import torch

from .reference import attention_shapes, logical_positions
from .reference_remap import RemapScheme

try:  # triton is optional at import time (CPU-only installs)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    triton = None
    tl = None

__all__ = ["remap_attention_triton"]

_MODES = {"self_extend": 0, "dual_chunk": 1}

if triton is not None:

    @triton.jit
    def _rotate(x1, x2, delta, inv_freq):
        """(x1, x2) rotated by delta[:, None] * inv_freq[None, :] (rotate-half halves, float32)."""
        angle = delta.to(tl.float32)[:, None] * inv_freq[None, :]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit(do_not_specialize=["H", "G", "Sq", "Skv", "P0", "P1", "P2"])
    def _remap_fwd_kernel(
        Q, K, V, O, POS, VALID, SEG, INV_FREQ,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
        H, G, Sq, Skv, qk_scale, softcap, P0, P1, P2,
        MODE: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SEG: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr, REST_P: tl.constexpr,
        DIM: tl.constexpr, DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_T: tl.constexpr,
    ):
        # Q/K/V/O have unit stride along D (the wrapper guarantees it). P0..P2: self_extend (window, group, -);
        # dual_chunk (chunk_size, local_size, chunk = chunk_size - local_size).
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        batch = pid_bh // H
        head = pid_bh % H
        kv_head = head // G
        q_offset = Skv - Sq

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Sq
        abs_q = q_offset + rows
        half = tl.arange(0, HALF_P)
        half_ok = half < HALF
        dims = tl.arange(0, DIM_P)
        dims_ok = dims < DIM

        q_base = Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs
        q1 = tl.load(q_base + half[None, :], mask=row_ok[:, None] & half_ok[None, :], other=0.0)
        q2 = tl.load(q_base + HALF + half[None, :], mask=row_ok[:, None] & half_ok[None, :], other=0.0)
        if REST > 0:
            rest = tl.arange(0, REST_P)
            rest_ok = rest < REST
            q3 = tl.load(q_base + 2 * HALF + rest[None, :], mask=row_ok[:, None] & rest_ok[None, :], other=0.0)
        inv_freq = tl.load(INV_FREQ + half, mask=half_ok, other=0.0)

        pos_base = batch * Skv
        q_pos = tl.load(POS + pos_base + abs_q, mask=row_ok, other=0)
        if HAS_SEG:
            q_seg = tl.load(SEG + pos_base + abs_q, mask=row_ok, other=-1)
        if MODE == 0:
            q_far = q_pos // P1 + P0 - P0 // P1
        else:
            q_far = tl.zeros_like(q_pos) + (P0 - 1)
            q_chunk = q_pos // P2
            q_local = (q_pos % P2) < P1
        q1f, q2f = _rotate(q1.to(tl.float32), q2.to(tl.float32), q_far - q_pos, inv_freq)
        q1, q2, q1f, q2f = q1.to(DOT_T), q2.to(DOT_T), q1f.to(DOT_T), q2f.to(DOT_T)
        if REST > 0:
            q3 = q3.to(DOT_T)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_P], dtype=tl.float32)
        k_base = K + batch * stride_kb + kv_head * stride_kh
        v_base = V + batch * stride_vb + kv_head * stride_vh
        hi = tl.minimum(q_offset + (pid_m + 1) * BLOCK_M, Skv)  # causal: later keys are never seen
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            k_ptr = k_base + cols[:, None] * stride_ks
            k1 = tl.load(k_ptr + half[None, :], mask=col_ok[:, None] & half_ok[None, :], other=0.0)
            k2 = tl.load(k_ptr + HALF + half[None, :], mask=col_ok[:, None] & half_ok[None, :], other=0.0)
            k_pos = tl.load(POS + pos_base + cols, mask=col_ok, other=0)
            if MODE == 0:
                k_far = k_pos // P1
            else:
                k_far = k_pos % P2
            k1f, k2f = _rotate(k1.to(tl.float32), k2.to(tl.float32), k_far - k_pos, inv_freq)
            k1, k2, k1f, k2f = k1.to(DOT_T), k2.to(DOT_T), k1f.to(DOT_T), k2f.to(DOT_T)

            s_near = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            s_near += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
            s_far = tl.dot(q1f, tl.trans(k1f), input_precision=PRECISION)
            s_far += tl.dot(q2f, tl.trans(k2f), input_precision=PRECISION)
            if REST > 0:
                k3 = tl.load(k_ptr + 2 * HALF + rest[None, :], mask=col_ok[:, None] & rest_ok[None, :], other=0.0)
                s_rest = tl.dot(q3, tl.trans(k3.to(DOT_T)), input_precision=PRECISION)
                s_near += s_rest
                s_far += s_rest

            if MODE == 0:
                near = (q_pos[:, None] - k_pos[None, :]) < P0
            else:
                k_chunk = k_pos // P2
                near = (q_chunk[:, None] == k_chunk[None, :]) | (
                    (q_chunk[:, None] == k_chunk[None, :] + 1) & q_local[:, None]
                )
            scores = tl.where(near, s_near, s_far) * qk_scale
            if HAS_SOFTCAP:
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)  # softcap * tanh(s / softcap)
            visible = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= abs_q[:, None])
            if HAS_VALID:
                k_valid = tl.load(VALID + pos_base + cols, mask=col_ok, other=0)
                visible = visible & (k_valid[None, :] != 0)
            if HAS_SEG:
                k_seg = tl.load(SEG + pos_base + cols, mask=col_ok, other=-2)
                visible = visible & (q_seg[:, None] == k_seg[None, :])
            scores = tl.where(visible, scores * LOG2E, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptr = v_base + cols[:, None] * stride_vs + dims[None, :]
            v = tl.load(v_ptr, mask=col_ok[:, None] & dims_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_T), v.to(DOT_T), input_precision=PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptr = O + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + dims[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dims_ok[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def remap_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    inv_freq: torch.Tensor,
    scheme: RemapScheme,
    scale: float | None = None,
    softcap: float | None = None,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``reference_remap.remap_attention`` (same arguments and result, forward only)."""
    if triton is None:
        raise ImportError("triton is not installed")
    batch, heads, kv_heads, q_len, kv_len, head_dim = attention_shapes(query, key, segment_ids)
    half = inv_freq.shape[0]
    if 2 * half > head_dim:
        raise ValueError(f"inv_freq has {half} frequencies, more than head_dim / 2 = {head_dim // 2}")
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    device = query.device
    positions = logical_positions(batch, kv_len, device, kv_valid, segment_ids).to(torch.int32).contiguous()
    valid = kv_valid.to(device=device, dtype=torch.int8).contiguous() if kv_valid is not None else positions
    segments = segment_ids.to(device=device, dtype=torch.int32).contiguous() if segment_ids is not None else positions
    out = torch.empty(batch, q_len, heads, head_dim, device=device, dtype=query.dtype).transpose(1, 2)
    if scheme.kind == "self_extend":
        params = (scheme.window, scheme.group, 1)
    else:
        params = (scheme.chunk_size, scheme.local_size, scheme.chunk)
    if _interpreted():  # the interpreter (triton 3.9) multiplies 16-bit tiles wrongly: fp32 products there
        precision, dot_dtype = "ieee", tl.float32
    else:
        precision = "ieee" if query.dtype == torch.float32 else None  # None: triton's default for 16-bit dots
        dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[query.dtype]
    block_m = 64 if q_len > 16 else 16
    block_n = 64
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _remap_fwd_kernel[grid](
        query, key, value, out, positions, valid, segments,
        inv_freq.to(device=device, dtype=torch.float32).contiguous(),
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, q_len, kv_len,
        head_dim**-0.5 if scale is None else scale, softcap or 1.0, *params,
        MODE=_MODES[scheme.kind],
        HAS_VALID=kv_valid is not None,
        HAS_SEG=segment_ids is not None,
        HAS_SOFTCAP=softcap is not None,
        HALF=half,
        HALF_P=_pow2(half),
        REST=head_dim - 2 * half,
        REST_P=_pow2(head_dim - 2 * half),
        DIM=head_dim,
        DIM_P=_pow2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=precision,
        DOT_T=dot_dtype,
        num_warps=4,
    )
    return out
