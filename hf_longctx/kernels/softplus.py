"""Triton softplus attention (LSSA / LSSAR), forward and backward, behind ``torch.library`` custom ops.

The formulas and the visibility rule are those of ``hf_longctx.kernels.reference_softplus`` (the oracle).
Entry point: :func:`softplus_attention_triton`, with the reference's signature and result. Shapes: ``query``
(B, H, Sq, D), ``key``/``value`` (B, H_kv, Skv, D), H = G * H_kv (GQA in the kernels, K/V never repeated); the
queries are the last Sq of the Skv positions. The result is (B, H, Sq, D) in ``query.dtype`` laid out as
(B, Sq, H, D), so ``out.transpose(1, 2)`` is contiguous.

Split of the work: PyTorch normalises q and k (``reference_softplus.unit``, fp32; autograd takes the gradient
through it), counts N_i (``visible_counts``) and folds the row factor into q before ONE rounding to the input
dtype: ``q_scaled = unit(q) * log(D) * log2(N_i)``. The kernels then compute in log2 units: ``x = q_scaled .
k_unit`` is the logit times log2(e) and ``a = log2(1 + exp2(x))`` is softplus / ln 2 (the ratios A and W do
not see the unit). Per score element: one MUFU ex2 (``t = exp2(-|x|)``), and ``a = max(x, 0) + t P(t)``
with a degree-5 polynomial P on the FMA pipe instead of a second MUFU op (a log2); the backward's
sigmoid is a polynomial in the same t (no divide). See benchmarks/NOTES-softplus-kernel.md.

* ``_fwd_kernel`` (one program per query block and head). LSSA: one pass, ``acc += a @ V``, ``Z += sum a``.
  No running max is needed: |x| <= log(D) log2(N) (< 90 at D=256, N=2^20) so exp2 cannot overflow, and the
  diagonal term makes Z >= 1 for every row that sees a key. LSSAR: pass 1 gives Z_i and max_j a_ij, hence the
  exact row peak ``peak_i = relu(N_i max_j a_ij / Z_i - O_i)`` (y is increasing in a); pass 2 accumulates
  ``r = (relu(y) / peak_i) ** p`` (an integer power by squaring, all in [0, 1]: no overflow, and no
  rescaling, since the true maximum is known before pass 2 -- the exact form of the online normalisation).
  Stats kept for the backward: Z, peak, S = sum r, as a (3, B, H, Sq) float32 tensor.
* Backward: ``_bwd_dq_kernel`` (query blocks; computes delta = rowsum(dO * O); for LSSAR first a pass for
  gamma_i = sum_j A_ij dA_ij, then dq) and ``_bwd_dkdv_kernel`` (key blocks, looping over the G heads of the
  group and the query rows at or after the block; no atomics). The dK/dV kernel works on transposed tiles
  [BLOCK_N, BLOCK_M] computed as k q^T and v dO^T, so no computed tile is transposed before a tl.dot: that
  pattern (tl.trans of an MMA result, lowered through a #linear layout to wgmma) gave a wrong dK on the H100
  with triton 3.6 (issue 8; the interpreter does not reproduce it). That is the "split" schedule of
  ``BWD_VARIANTS``; "fused" (the default; :func:`backward_variant` picks either) runs ``_bwd_dq_kernel`` for
  delta / gamma only, then ``_bwd_dkdv_kernel`` with ``FUSED_DQ``, which also adds dq^T = k^T dX^T into a zeroed
  fp32 buffer by atomics (5 matmuls per score element instead of 7; the computed dX^T is a dot operand
  untransposed).

Masks: the sink kernel's segments (``sink_window.kv_valid_to_spans`` / ``segment_table``, mode 0 / 1 / 2; see
that module) and its program-to-segment map; rows and keys beyond a segment's keys are masked, and a fully
masked key tile is never visited (each query block loops only to its diagonal).

Contract: bf16 / fp16 on CUDA (fp32 only under the interpreter), head dims ``SUPPORTED_HEAD_DIMS``; anything
unsupported raises ValueError naming the parameter.
"""

from __future__ import annotations

import os

import torch

from . import sink_window
from .schedules import Schedules
from .reference_softplus import row_scale, unit, visible_counts

try:  # triton is optional at import time (CPU-only installs)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    triton = None
    tl = None

__all__ = ["BWD_VARIANTS", "MAX_POWER", "backward_variant", "softplus_attention_triton", "unsupported_reason"]

MAX_POWER = 64
_LN2 = 0.6931471805599453
# Block sizes under the Triton interpreter (CPU tests). Tests may change them.
INTERPRET_BLOCKS = {"m": 16, "n": 16}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    from .sink_window import _load_kv, _program_segment, _store_dkdv

    @triton.jit
    def _ipow(x, P: tl.constexpr):
        """x ** P for a constexpr integer 1 <= P < 128 by squaring: P = 15 costs 3 squarings + 3 products."""
        base = x
        result = x
        for bit in tl.static_range(7):
            if (P >> bit) & 1:
                if P & ((1 << bit) - 1):  # a lower bit already started the product
                    result = result * base
                else:
                    result = base
            if (P >> (bit + 1)) > 0:
                base = base * base
        return result

    @triton.jit
    def _tile(q, k, rows, cols, k_lo, k_hi, MASKED: tl.constexpr, GRAD: tl.constexpr, KEYS_FIRST: tl.constexpr,
              DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
        """(a, sig) of a [BM, BN] tile (rows x keys), or of its transpose [BN, BM] with KEYS_FIRST (computed as
        k q^T: the dK/dV kernel then never transposes a computed tile, see _dkdv_pass); x = q . k (log2 units: q
        carries log(D) log2(N_i)).

        a = log2(1 + exp2(x)) = max(x, 0) + log2(1 + t), t = exp2(-|x|) in (0, 1]: ONE ex2 on the MUFU; the
        log is the polynomial t * P(t) (degree 5; relative error 8e-6 on [0, 1]). sig = sigmoid(x ln 2) = da/dx (GRAD
        only, again a polynomial in the same t: t / (1 + t) = t * R(t), degree 6, relative error 9e-6). a = 0 masked.
        """
        if KEYS_FIRST:
            x = tl.dot(k.to(DOT_T), tl.trans(q.to(DOT_T)), input_precision=DOT_PREC)
        else:
            x = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
        t = tl.exp2(-tl.abs(x))
        log1p = t * (1.4426828622817993 + t * (-0.7204262018203735 + t * (0.46917420625686646 + t * (
            -0.30303651094436646 + t * (0.1460331827402115 + t * -0.03443600982427597)))))
        a = tl.maximum(x, 0.0) + log1p
        if MASKED:
            key_in = (cols < k_hi) & (cols >= k_lo)
            if KEYS_FIRST:
                ok = (cols[:, None] <= rows[None, :]) & key_in[:, None]
            else:
                ok = (cols[None, :] <= rows[:, None]) & key_in[None, :]
            a = tl.where(ok, a, 0.0)
        sig = a
        if GRAD:
            small = t * (0.999991238117218 + t * (-0.9991334080696106 + t * (0.9854082465171814 + t * (
                -0.903057336807251 + t * (0.667769193649292 + t * (-0.32268026471138 + t * 0.07170669734477997))))))
            sig = tl.where(x >= 0.0, 1.0 - small, small)
        return a, sig

    @triton.jit
    def _load_block(ptrs, rows_ok, d_ok, MASKED: tl.constexpr, PAD_D: tl.constexpr):
        """A [rows, BLOCK_D] tile: masked rows / padded head dim read as 0; no mask at all in the common case."""
        if MASKED:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        elif PAD_D:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_kn, stride_vn, lo, hi, rows, k_lo, k_hi,
                  gain, shift, PASS: tl.constexpr, POWER: tl.constexpr, MASKED: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
        """PASS 0: LSSA (acc, z). PASS 1: LSSAR statistics (z, max a). PASS 2: LSSAR re-weighting (acc, s_sum),
        r = relu(a * gain - shift) ** P with gain = N_i / (Z_i peak_i), shift = O_i / peak_i (r in [0, 1])."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
        v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
        for start in range(lo, hi, BLOCK_N):
            cols = start + offs_n
            off = tl.cast(start, tl.int64)
            k = _load_block(k_base + off * stride_kn + k_tile, cols < hi, d_ok, MASKED, BLOCK_D != HEAD_DIM)
            a, _ = _tile(q, k, rows, cols, k_lo, k_hi, MASKED, False, False, DOT_T, DOT_PREC)
            if PASS == 1:
                z += tl.sum(a, 1)
                peak = tl.maximum(peak, tl.max(a, 1))
            else:
                if PASS == 2:
                    a = _ipow(tl.maximum(a * gain[:, None] - shift[:, None], 0.0), POWER)
                    s_sum += tl.sum(a, 1)
                else:
                    z += tl.sum(a, 1)
                v = _load_block(v_base + off * stride_vn + v_tile, cols < hi, d_ok, MASKED, BLOCK_D != HEAD_DIM)
                acc = tl.dot(a.to(DOT_T), v.to(DOT_T), acc, input_precision=DOT_PREC)
        return acc, z, peak, s_sum

    @triton.jit(do_not_specialize=["B", "H", "G", "Sq", "Skv", "SQ_BUCKET"])
    def _fwd_kernel(Q, K, V, O, STATS, NQ, SEG, WORK,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                    B, H, G, Sq, Skv, SQ_BUCKET,
                    MODE: tl.constexpr, REWEIGHT: tl.constexpr, POWER: tl.constexpr, DOT_T: tl.constexpr,
                    DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_blk = tl.program_id(0)
        if MODE != 2:
            pid_blk = tl.num_programs(0) - 1 - pid_blk  # longest rows first; grid (blocks, B*H): head-major
        blk, b, h, q_lo, q_hi, k_lo, k_hi = _program_segment(pid_blk, tl.program_id(1), SEG, WORK, H, Sq, Skv, MODE)
        hk = h // G
        q_off = Skv - Sq
        r0 = q_lo + blk * BLOCK_M
        rows = r0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < q_hi
        d_ok = offs_d < HEAD_DIM
        b64 = b.to(tl.int64)
        q_rows = (rows - q_off).to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
        kend = tl.maximum(tl.minimum(tl.minimum(r0 + BLOCK_M, q_hi), k_hi), k_lo)  # keys any row may see
        full_end = k_lo + tl.maximum(tl.minimum(r0 + 1, k_hi) - k_lo, 0) // BLOCK_N * BLOCK_N  # seen by all rows

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        z = tl.zeros([BLOCK_M], dtype=tl.float32)
        peak = tl.zeros([BLOCK_M], dtype=tl.float32)
        s_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        if REWEIGHT:
            acc, z, peak, s_sum = _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_ks, stride_vs, k_lo,
                                            full_end, rows, k_lo, k_hi, z, z, 1, POWER, False,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            acc, z, peak, s_sum = _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_ks, stride_vs, full_end,
                                            kend, rows, k_lo, k_hi, z, z, 1, POWER, True,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            n_i = tl.load(NQ + b64 * Sq + q_rows, mask=row_ok, other=0.0)
            o_i = tl.where(n_i > 3.0, 1.0, 0.0)
            ratio = n_i / tl.where(z > 0.0, z, 1.0)
            peak = tl.maximum(ratio * peak - o_i, 0.0)
            inv_peak = 1.0 / tl.where(peak > 0.0, peak, 1.0)
            gain = ratio * inv_peak
            shift = o_i * inv_peak
            acc, z, peak, s_sum = _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_ks, stride_vs, k_lo,
                                            full_end, rows, k_lo, k_hi, gain, shift, 2, POWER, False,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            acc, z, peak, s_sum = _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_ks, stride_vs, full_end,
                                            kend, rows, k_lo, k_hi, gain, shift, 2, POWER, True,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            out = acc * (1.0 / tl.where(s_sum > 0.0, s_sum, 1.0))[:, None]
        else:
            acc, z, peak, s_sum = _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_ks, stride_vs, k_lo,
                                            full_end, rows, k_lo, k_hi, z, z, 0, POWER, False,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            acc, z, peak, s_sum = _fwd_pass(acc, z, peak, s_sum, q, k_base, v_base, stride_ks, stride_vs, full_end,
                                            kend, rows, k_lo, k_hi, z, z, 0, POWER, True,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            out = acc * (1.0 / tl.where(z > 0.0, z, 1.0))[:, None]
        tl.store(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_rows[:, None] * stride_os + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        stat = (b64 * H + h) * Sq + q_rows
        plane = B * H * Sq
        tl.store(STATS + stat, z, mask=row_ok)
        tl.store(STATS + plane + stat, peak, mask=row_ok)
        tl.store(STATS + 2 * plane + stat, s_sum, mask=row_ok)

    @triton.jit
    def _row_factors(STATS, NQ, stat, plane, nq_off, row_ok, REWEIGHT: tl.constexpr):
        """Per-row factors of the backward from the forward's stats: (inv_z, n_i, o_i, inv_peak, inv_s)."""
        z = tl.load(STATS + stat, mask=row_ok, other=1.0)
        inv_z = 1.0 / tl.where(z > 0.0, z, 1.0)
        n_i = inv_z
        o_i = inv_z
        inv_peak = inv_z
        inv_s = inv_z
        if REWEIGHT:
            n_i = tl.load(NQ + nq_off, mask=row_ok, other=0.0)
            o_i = tl.where(n_i > 3.0, 1.0, 0.0)
            peak = tl.load(STATS + plane + stat, mask=row_ok, other=1.0)
            s_sum = tl.load(STATS + 2 * plane + stat, mask=row_ok, other=1.0)
            inv_peak = 1.0 / tl.where(peak > 0.0, peak, 1.0)
            inv_s = 1.0 / tl.where(s_sum > 0.0, s_sum, 1.0)
        return inv_z, n_i, o_i, inv_peak, inv_s

    @triton.jit
    def _per_row(x, KEYS_FIRST: tl.constexpr):
        """A [BM] per-row vector shaped to broadcast over a [BM, BN] tile, or over a [BN, BM] one (KEYS_FIRST)."""
        if KEYS_FIRST:
            y = x[None, :]
        else:
            y = x[:, None]
        return y

    @triton.jit
    def _grad_scores(a, sig, dp, inv_z, n_i, o_i, inv_peak, inv_s, delta, gamma,
                     REWEIGHT: tl.constexpr, POWER: tl.constexpr, KEYS_FIRST: tl.constexpr):
        """(P, dX, A dA) of a tile: P the attention weights, dX the gradient of x (the log2-unit logits, whose
        d a / d x is ``sig``), A dA the terms of gamma_i = sum_j A_ij dA_ij (LSSAR; dA before the normalisation).
        The tile is [BM, BN] (rows x keys), or [BN, BM] with KEYS_FIRST; the row factors are [BM] vectors."""
        inv_z = _per_row(inv_z, KEYS_FIRST)
        A = a * inv_z
        if REWEIGHT:
            n_i = _per_row(n_i, KEYS_FIRST)
            inv_peak = _per_row(inv_peak, KEYS_FIRST)
            inv_s = _per_row(inv_s, KEYS_FIRST)
            u = tl.maximum(A * n_i - _per_row(o_i, KEYS_FIRST), 0.0)
            u = tl.where(a > 0.0, u, 0.0)
            ratio = u * inv_peak
            if POWER > 1:
                lower = _ipow(ratio, POWER - 1)
            else:
                lower = tl.where(u > 0.0, 1.0, 0.0)
            p = lower * ratio * inv_s
            d_a = (dp - _per_row(delta, KEYS_FIRST)) * (lower * (POWER * inv_peak * inv_s * n_i))
            d_a = tl.where(u > 0.0, d_a, 0.0)
            da = (d_a - _per_row(gamma, KEYS_FIRST)) * inv_z
        else:
            p = A
            d_a = dp
            da = (dp - _per_row(delta, KEYS_FIRST)) * inv_z
        return p, da * sig, A * d_a

    @triton.jit
    def _dq_pass(dq, gamma, q, do, k_base, v_base, stride_kn, stride_vn, lo, hi, rows, k_lo, k_hi,
                 inv_z, n_i, o_i, inv_peak, inv_s, delta, GAMMA_PASS: tl.constexpr, REWEIGHT: tl.constexpr,
                 POWER: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
        v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
        for start in range(lo, hi, BLOCK_N):
            cols = start + offs_n
            off = tl.cast(start, tl.int64)
            k = _load_block(k_base + off * stride_kn + k_tile, cols < hi, d_ok, MASKED, BLOCK_D != HEAD_DIM)
            v = _load_block(v_base + off * stride_vn + v_tile, cols < hi, d_ok, MASKED, BLOCK_D != HEAD_DIM)
            a, sig = _tile(q, k, rows, cols, k_lo, k_hi, MASKED, not GAMMA_PASS, False, DOT_T, DOT_PREC)
            dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T)), input_precision=DOT_PREC)
            p, dx, a_da = _grad_scores(a, sig, dp, inv_z, n_i, o_i, inv_peak, inv_s, delta, gamma, REWEIGHT, POWER,
                                       False)
            if GAMMA_PASS:
                gamma += tl.sum(a_da, 1)
            else:
                if MASKED:
                    dx = tl.where(a > 0.0, dx, 0.0)
                dq = tl.dot(dx.to(DOT_T), k.to(DOT_T), dq, input_precision=DOT_PREC)
        return dq, gamma

    @triton.jit
    def _dq_keys(dq, gamma, q, do, k_base, v_base, stride_kn, stride_vn, full_end, kend, rows, k_lo, k_hi,
                 inv_z, n_i, o_i, inv_peak, inv_s, delta, GAMMA_PASS: tl.constexpr, REWEIGHT: tl.constexpr,
                 POWER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
        """:func:`_dq_pass` over all keys of a query block: the full key blocks [k_lo, full_end) unmasked, then
        [full_end, kend) with the causal / segment mask."""
        dq, gamma = _dq_pass(dq, gamma, q, do, k_base, v_base, stride_kn, stride_vn, k_lo, full_end, rows, k_lo, k_hi,
                             inv_z, n_i, o_i, inv_peak, inv_s, delta, GAMMA_PASS, REWEIGHT, POWER, False, BLOCK_N,
                             BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
        return _dq_pass(dq, gamma, q, do, k_base, v_base, stride_kn, stride_vn, full_end, kend, rows, k_lo, k_hi,
                        inv_z, n_i, o_i, inv_peak, inv_s, delta, GAMMA_PASS, REWEIGHT, POWER, True, BLOCK_N, BLOCK_D,
                        HEAD_DIM, DOT_T, DOT_PREC)

    @triton.jit(do_not_specialize=["B", "H", "G", "Sq", "Skv", "SQ_BUCKET"])
    def _bwd_dq_kernel(Q, K, V, O, DO, STATS, NQ, DELTA, DQ, SEG, WORK,
                       stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                       stride_dob, stride_doh, stride_dos, stride_dqb, stride_dqh, stride_dqs,
                       B, H, G, Sq, Skv, SQ_BUCKET,
                       MODE: tl.constexpr, REWEIGHT: tl.constexpr, POWER: tl.constexpr, DOT_T: tl.constexpr,
                       DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_DQ: tl.constexpr):
        """Per query block: delta = rowsum(dO * O) and (LSSAR) gamma, stored in DELTA (2, B, H, Sq); then dq
        (WITH_DQ, the split backward). Without WITH_DQ it is the fused backward's first pass and DQ is unused."""
        pid_blk = tl.program_id(0)
        if MODE != 2:
            pid_blk = tl.num_programs(0) - 1 - pid_blk
        blk, b, h, q_lo, q_hi, k_lo, k_hi = _program_segment(pid_blk, tl.program_id(1), SEG, WORK, H, Sq, Skv, MODE)
        hk = h // G
        q_off = Skv - Sq
        r0 = q_lo + blk * BLOCK_M
        rows = r0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < q_hi
        tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_rows = (rows - q_off).to(tl.int64)
        tile = q_rows[:, None]
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + tile * stride_qs + offs_d[None, :], mask=tile_ok, other=0.0)
        do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + tile * stride_dos + offs_d[None, :], mask=tile_ok,
                     other=0.0)
        o = tl.load(O + b64 * stride_ob + h64 * stride_oh + tile * stride_os + offs_d[None, :], mask=tile_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        stat = (b64 * H + h) * Sq + q_rows
        plane = B * H * Sq
        inv_z, n_i, o_i, inv_peak, inv_s = _row_factors(STATS, NQ, stat, plane, b64 * Sq + q_rows, row_ok, REWEIGHT)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
        kend = tl.maximum(tl.minimum(tl.minimum(r0 + BLOCK_M, q_hi), k_hi), k_lo)
        full_end = k_lo + tl.maximum(tl.minimum(r0 + 1, k_hi) - k_lo, 0) // BLOCK_N * BLOCK_N

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        gamma = tl.zeros([BLOCK_M], dtype=tl.float32)
        if REWEIGHT:
            dq, gamma = _dq_keys(dq, gamma, q, do, k_base, v_base, stride_ks, stride_vs, full_end, kend, rows, k_lo,
                                 k_hi, inv_z, n_i, o_i, inv_peak, inv_s, delta, True, REWEIGHT, POWER, BLOCK_N,
                                 BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
        if WITH_DQ:
            dq, gamma = _dq_keys(dq, gamma, q, do, k_base, v_base, stride_ks, stride_vs, full_end, kend, rows, k_lo,
                                 k_hi, inv_z, n_i, o_i, inv_peak, inv_s, delta, False, REWEIGHT, POWER, BLOCK_N,
                                 BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + tile * stride_dqs + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=tile_ok)
        tl.store(DELTA + stat, delta, mask=row_ok)
        tl.store(DELTA + plane + stat, gamma, mask=row_ok)

    @triton.jit
    def _dkdv_pass(dk, dv, k, v, q_base, do_base, dq_base, STATS, NQ, stat_base, nq_base, delta_base, plane,
                   stride_qs, stride_dos, stride_dqs, q_off, lo, hi, cols, k_lo, k_hi, REWEIGHT: tl.constexpr,
                   POWER: tl.constexpr, MASKED: tl.constexpr, FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
        """dK, dV [BLOCK_N, BLOCK_D] of the key block ``cols`` += the query rows [lo, hi) of one head. FUSED_DQ: also
        adds those rows' dq^T = k^T dX^T [BLOCK_D, BLOCK_M] (fp32) into the fp32 buffer at ``dq_base`` by atomics."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for start in range(lo, hi, BLOCK_M):
            rows = start + offs_m
            row_ok = rows < hi
            q_rows = (rows - q_off).to(tl.int64)
            q = _load_block(q_base + q_rows[:, None] * stride_qs + offs_d[None, :], row_ok, d_ok, MASKED,
                            BLOCK_D != HEAD_DIM)
            do = _load_block(do_base + q_rows[:, None] * stride_dos + offs_d[None, :], row_ok, d_ok, MASKED,
                             BLOCK_D != HEAD_DIM)
            inv_z, n_i, o_i, inv_peak, inv_s = _row_factors(STATS, NQ, stat_base + q_rows, plane, nq_base + q_rows,
                                                            row_ok, REWEIGHT)
            delta = tl.load(delta_base + q_rows, mask=row_ok, other=0.0)
            gamma = tl.load(delta_base + plane + q_rows, mask=row_ok, other=0.0)
            # transposed tiles [BLOCK_N, BLOCK_M] straight from the MMAs (k q^T, v dO^T): a tl.trans of a computed
            # tile feeding tl.dot gave a wrong dK on the H100 with triton 3.6 (issue 8); only loaded tiles are
            # transposed here
            a, sig = _tile(q, k, rows, cols, k_lo, k_hi, MASKED, True, True, DOT_T, DOT_PREC)
            if MASKED:
                a = tl.where(row_ok[None, :], a, 0.0)
            dp = tl.dot(v.to(DOT_T), tl.trans(do.to(DOT_T)), input_precision=DOT_PREC)
            p, dx, a_da = _grad_scores(a, sig, dp, inv_z, n_i, o_i, inv_peak, inv_s, delta, gamma, REWEIGHT, POWER,
                                       True)
            if MASKED:
                dx = tl.where(a > 0.0, dx, 0.0)
            dv = tl.dot(p.to(DOT_T), do.to(DOT_T), dv, input_precision=DOT_PREC)
            dk = tl.dot(dx.to(DOT_T), q.to(DOT_T), dk, input_precision=DOT_PREC)
            if FUSED_DQ:
                # dq^T = k^T dX^T: the computed tile dX^T is the B operand as it is (a loaded tile is transposed)
                dq_t = tl.dot(tl.trans(k.to(DOT_T)), dx.to(DOT_T), input_precision=DOT_PREC)
                tl.atomic_add(dq_base + q_rows[None, :] * stride_dqs + offs_d[:, None], dq_t,
                              mask=d_ok[:, None] & row_ok[None, :], sem="relaxed")
        return dk, dv

    @triton.jit(do_not_specialize=["B", "H", "Hkv", "G", "Sq", "Skv", "SQ_BUCKET"])
    def _bwd_dkdv_kernel(Q, K, V, DO, STATS, NQ, DELTA, DK, DV, DQ, SEG, WORK,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                         stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                         stride_dqb, stride_dqh, stride_dqs,
                         B, H, Hkv, G, Sq, Skv, SQ_BUCKET,
                         MODE: tl.constexpr, REWEIGHT: tl.constexpr, POWER: tl.constexpr, DOT_T: tl.constexpr,
                         DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FUSED_DQ: tl.constexpr):
        """Per key block and (batch, KV head): dK, dV summed over the G query heads of the group, from delta / gamma
        in DELTA. FUSED_DQ (the fused backward): dq too, added into the zero-initialised fp32 DQ (B, H, Sq, D) by
        atomics, one [BLOCK_D, BLOCK_M] tile per (row block, head); without it DQ is unused."""
        blk, b, hk, q_lo, q_hi, k_lo, k_hi = _program_segment(tl.program_id(0), tl.program_id(1), SEG, WORK, Hkv,
                                                             Sq, Skv, MODE)
        q_off = Skv - Sq
        n0 = k_lo + blk * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        b64 = b.to(tl.int64)
        k, v = _load_kv(K, V, b, hk, cols, k_hi, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        BLOCK_D, HEAD_DIM)
        # rows that see the block: [r_start, q_hi); masked diagonal rows, then full row blocks, then a masked tail
        r_start = tl.maximum(n0, q_lo)
        r_end = tl.where(n0 < k_hi, tl.maximum(q_hi, r_start), r_start)
        low_end = tl.minimum(r_start + tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - r_start, 0), BLOCK_M) * BLOCK_M, r_end)
        low_end = tl.where(n0 + BLOCK_N <= k_hi, low_end, r_end)  # a block past the keys' end: all masked
        mid_end = low_end + (r_end - low_end) // BLOCK_M * BLOCK_M
        plane = B * H * Sq
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(G):
            h64 = (hk * G + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh
            stat_base = (b64 * H + h64) * Sq
            delta_base = DELTA + stat_base
            nq_base = b64 * Sq
            dk, dv = _dkdv_pass(dk, dv, k, v, q_base, do_base, dq_base, STATS, NQ, stat_base, nq_base, delta_base,
                                plane, stride_qs, stride_dos, stride_dqs, q_off, r_start, low_end, cols, k_lo, k_hi,
                                REWEIGHT, POWER, True, FUSED_DQ, BLOCK_M, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            dk, dv = _dkdv_pass(dk, dv, k, v, q_base, do_base, dq_base, STATS, NQ, stat_base, nq_base, delta_base,
                                plane, stride_qs, stride_dos, stride_dqs, q_off, low_end, mid_end, cols, k_lo, k_hi,
                                REWEIGHT, POWER, False, FUSED_DQ, BLOCK_M, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
            dk, dv = _dkdv_pass(dk, dv, k, v, q_base, do_base, dq_base, STATS, NQ, stat_base, nq_base, delta_base,
                                plane, stride_qs, stride_dos, stride_dqs, q_off, mid_end, r_end, cols, k_lo, k_hi,
                                REWEIGHT, POWER, True, FUSED_DQ, BLOCK_M, BLOCK_D, HEAD_DIM, DOT_T, DOT_PREC)
        _store_dkdv(DK, DV, dk, dv, b, hk, cols, k_hi, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh,
                    stride_dvs, BLOCK_D, HEAD_DIM)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
_TUNED: dict = {}


def _configs(kind: str, head_dim_p: int) -> list:
    """Autotuning spaces, at most two configs (two compiles) per kernel; the first is used with
    HF_LONGCTX_AUTOTUNE=0. Chosen from sm_90 builds made without a GPU (NOTES-softplus-kernel.md: registers,
    spills, shared memory); every config of a kind has the same outer block (it fixes the grid)."""
    C = triton.Config
    if head_dim_p >= 256:
        return {"fwd": [C({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
                "dq": [C({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)],
                "stats": [C({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1)],  # LSSAR 157 regs, 0 B
                "dkdv": [C({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)],
                "fused": [C({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1)]}[kind]  # 217 regs, 0 B
    return {"fwd": [C({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
                    C({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2)],
            "dq": [C({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
                   C({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)],
            # BLOCK_M 64 spills 1.5 KB; stages 1 spills less (LSSAR 208 B vs 392 B, sm_90, triton 3.6)
            "dkdv": [C({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
                     C({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=1)],
            # fused backward's first pass: delta, and for LSSAR the gamma pass (no dq accumulator: LSSAR 175 regs
            # at 64 keys, no spill)
            "stats": [C({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
                      C({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2)],
            # the dK/dV body plus the dq^T tile: 16 rows spill 72 / 128 B (LSSA / LSSAR), 32 rows 192 / 392 B
            # (sm_90a, triton 3.9, NOTES "Fused backward"); the wider MMAs of 32 rows may still win
            "fused": [C({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=8, num_stages=2),
                      C({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2)]}[kind]


# Kernel kinds whose programs own a key block (the others own a query block).
_KEY_BLOCKED = ("dkdv", "fused")


def _outer(kind: str, head_dim_p: int) -> int:
    """Outer block (the one the grid / work table is built on) of a kernel kind."""
    if _interpret():
        return INTERPRET_BLOCKS["n" if kind in _KEY_BLOCKED else "m"]
    first = _configs(kind, head_dim_p)[0].kwargs
    return first["BLOCK_N" if kind in _KEY_BLOCKED else "BLOCK_M"]


def _run(kind: str, grid, args: list, meta: dict, head_dim_p: int) -> None:
    kernel = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "stats": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel,
              "fused": _bwd_dkdv_kernel}[kind]
    if _interpret():
        kernel[grid](*args, **meta, BLOCK_M=INTERPRET_BLOCKS["m"], BLOCK_N=INTERPRET_BLOCKS["n"])
        return
    key = (kind, head_dim_p >= 256)
    tuned = _TUNED.get(key)
    if tuned is None:
        configs = _configs(kind, head_dim_p)
        if os.environ.get("HF_LONGCTX_AUTOTUNE", "1") == "0":
            configs = configs[:1]
        # re-tuned per length bucket (sink_window._sq_bucket), not per length: one tuning per bucket; the fused
        # kernel accumulates dq by atomics, so each tuning run starts from zeros
        tuned = triton.autotune(configs=configs, key=["SQ_BUCKET", "REWEIGHT"],
                                reset_to_zero=["DQ"] if kind == "fused" else None)(kernel)
        _TUNED[key] = tuned
    tuned[grid](*args, **meta)


def _dot_types(dtype: torch.dtype):
    if _interpret():  # the interpreter multiplies 16-bit tiles wrongly (see sink_window._common)
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], None


def _grid(kind: str, seg, mode: int, length: int, rows: int, head_dim_p: int, q: torch.Tensor):
    """(grid, work table) of a kernel whose outer blocks tile ``length`` positions for ``rows`` (batch*heads)."""
    block = _outer(kind, head_dim_p)
    if mode == 2:
        cols = (3, 4) if kind in _KEY_BLOCKED else (1, 2)
        work = sink_window._work_table(seg, cols[0], cols[1], block, length, q.shape[0])
        return (work.shape[0], rows), work
    return (triton.cdiv(length, block), rows), sink_window._dummy(q)


def _forward(q, k, v, counts, seg, mode, reweight, power):
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    out = torch.empty(B, Sq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    stats = torch.zeros(3, B, H, Sq, device=q.device, dtype=torch.float32)
    if Sq == 0:
        return out, stats
    block_d = max(16, triton.next_power_of_2(D))
    seg_t = seg if seg is not None else sink_window._dummy(q)
    grid, work = _grid("fwd", seg, mode, Sq, H if mode == 2 else B * H, block_d, q)
    dot_t, prec = _dot_types(q.dtype)
    args = [q, k, v, out, stats, counts, seg_t, work, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], B, H, H // Hkv, Sq, Skv, sink_window._sq_bucket(Skv)]
    meta = dict(MODE=mode, REWEIGHT=reweight, POWER=power, DOT_T=dot_t, DOT_PREC=prec, HEAD_DIM=D, BLOCK_D=block_d)
    _run("fwd", grid, args, meta, block_d)
    return out, stats


# Backward schedules: (kind of the query-block kernel, kind of the key-block kernel). benchmarks/softplus_attention.py
# --bwd-variants times them side by side; NOTES-softplus-kernel.md ("Fused backward") says what each costs.
#   split: _bwd_dq_kernel writes dq (LSSAR: after its gamma pass), then _bwd_dkdv_kernel writes dK/dV:
#          7 matmuls per score element (LSSAR 9), two elementwise passes
#   fused: _bwd_dq_kernel computes only delta (LSSAR: and gamma, 2 matmuls), then _bwd_dkdv_kernel writes dK/dV
#          and adds dq into an fp32 buffer by atomics: 5 matmuls (LSSAR 7), one elementwise pass for dq/dK/dV
# "fused" is the default: faster on the H100 in every measured case (results/softplus_attention.md: 4-10%), but its
# fp32 atomics make dq run-to-run nondeterministic, so under torch.use_deterministic_algorithms(True) the backward
# runs "split". Every mode (dense, padding, packed) runs either.
BWD_VARIANTS = {"split": ("dq", "dkdv"), "fused": ("stats", "fused")}


_BWD_SCHEDULES = Schedules("backward variant", BWD_VARIANTS, "fused")
# ``with backward_variant(name):`` runs the backward with another schedule of BWD_VARIANTS (benchmarks, tests); the
# schedule is read when the backward runs, so ``.backward()`` must be called inside the block
backward_variant = _BWD_SCHEDULES.use


def _backward(do, q, k, v, o, counts, stats, seg, mode, reweight, power):
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if Sq == 0 or Skv == 0:
        return torch.zeros_like(q), dk, dv
    rows_kind, keys_kind = BWD_VARIANTS["split"] if torch.are_deterministic_algorithms_enabled() \
        else _BWD_SCHEDULES.current
    fused = keys_kind == "fused"
    # split: the dq kernel writes dq; fused: the dK/dV kernel adds it into fp32 zeros (cast once at the end)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if fused else torch.empty_like(q)
    do = do if do.stride(-1) == 1 else do.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    seg_t = seg if seg is not None else sink_window._dummy(q)
    dot_t, prec = _dot_types(q.dtype)
    meta = dict(MODE=mode, REWEIGHT=reweight, POWER=power, DOT_T=dot_t, DOT_PREC=prec, HEAD_DIM=D, BLOCK_D=block_d)
    delta = torch.zeros(2, B, H, Sq, device=q.device, dtype=torch.float32)  # delta, gamma
    grid, work = _grid(rows_kind, seg, mode, Sq, H if mode == 2 else B * H, block_d, q)
    args = [q, k, v, o, do, stats, counts, delta, dq, seg_t, work, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], B, H, H // Hkv, Sq, Skv,
            sink_window._sq_bucket(Skv)]
    _run(rows_kind, grid, args, dict(meta, WITH_DQ=not fused), block_d)
    grid, work = _grid(keys_kind, seg, mode, Skv, Hkv if mode == 2 else B * Hkv, block_d, q)
    args = [q, k, v, do, stats, counts, delta, dk, dv, dq, seg_t, work, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *dq.stride()[:3], B, H, Hkv,
            H // Hkv, Sq, Skv, sink_window._sq_bucket(Skv)]
    _run(keys_kind, grid, args, dict(meta, FUSED_DQ=fused), block_d)
    return dq.to(q.dtype), dk, dv


# --------------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_longctx::softplus_fwd", mutates_args=())
def softplus_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                 segments: torch.Tensor | None, mode: int, reweight: bool, power: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, H, Sq, D) laid out as (B, Sq, H, D), stats (3, B, H, Sq) float32).

    ``q``: unit queries times log(D) log2(N_i) (so q . k is the logit in log2 units); ``k``: unit keys.

    ``counts``: (B, Sq) float32 N_i; ``mode`` 0/1/2 with ``segments`` None / (B, 2) spans / (n_seg, 5).
    """
    return _forward(q, k, v, counts, segments, mode, reweight, power)


@softplus_fwd.register_fake
def _(q, k, v, counts, segments, mode, reweight, power):
    B, H, Sq, D = q.shape
    return q.new_empty(B, Sq, H, D).transpose(1, 2), q.new_empty(3, B, H, Sq, dtype=torch.float32)


@torch.library.custom_op("hf_longctx::softplus_bwd", mutates_args=())
def softplus_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 counts: torch.Tensor, stats: torch.Tensor, segments: torch.Tensor | None, mode: int,
                 reweight: bool, power: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv) of the scaled q, the unit k and v."""
    return _backward(do, q, k, v, o, counts, stats, segments, mode, reweight, power)


@softplus_bwd.register_fake
def _(do, q, k, v, o, counts, stats, segments, mode, reweight, power):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, counts, segments, mode, reweight, power = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, counts, stats, segments)
    ctx.params = (mode, reweight, power)


def _backward_fn(ctx, grad_out, grad_stats):
    q, k, v, out, counts, stats, segments = ctx.saved_tensors
    mode, reweight, power = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = softplus_bwd(grad_out, q, k, v, out, counts, stats, segments, mode, reweight, power)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("hf_longctx::softplus_fwd", _backward_fn, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------
def unsupported_reason(query, key, value, *, reweight=True, power=15, kv_valid=None, segment_ids=None) -> str | None:
    """Why the Triton path cannot run these inputs (a message naming the parameter), or None."""
    if isinstance(power, bool) or not isinstance(power, int) or not 1 <= power <= MAX_POWER:
        return f"power must be an integer in [1, {MAX_POWER}], got {power!r}"
    if not isinstance(reweight, bool):
        return f"reweight must be a bool, got {reweight!r}"
    return sink_window.unsupported_reason(query, key, value, kv_valid=kv_valid, segment_ids=segment_ids)


def softplus_attention_triton(query, key, value, *, reweight: bool = True, power: int = 15,
                              kv_valid: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                              query_chunk: int | None = None) -> torch.Tensor:
    """Softplus attention (Triton), same contract as ``reference_softplus.softplus_attention``.

    query (B, H, Sq, D); key, value (B, H_kv, Skv, D). ``kv_valid`` (B, Skv) bool: one contiguous span of real
    tokens per row (ValueError for holes; one host sync). ``segment_ids`` (B, Skv): packed sequences (Sq == Skv;
    one host sync). Returns (B, H, Sq, D) in query.dtype, differentiable in query, key and value.
    ``query_chunk`` is the reference's tile size, accepted and ignored here.
    """
    reason = unsupported_reason(query, key, value, reweight=reweight, power=power, kv_valid=kv_valid,
                                segment_ids=segment_ids)
    if reason is not None:
        raise ValueError(f"softplus_attention_triton: {reason}")
    B, H, Sq, D = query.shape
    Skv = key.shape[2]
    if Skv == 0 or query.numel() == 0:
        return query.new_zeros(B, Sq, H, D).transpose(1, 2)
    mode, seg = 0, None
    if segment_ids is not None:
        mode, seg = 2, sink_window.segment_table(segment_ids, kv_valid)
    elif kv_valid is not None:
        mode, seg = 1, sink_window.kv_valid_to_spans(kv_valid)
    counts = visible_counts(B, Sq, Skv, query.device, kv_valid, segment_ids).contiguous()
    # x = log(D) log(N_i) cos / ln 2: the logit in log2 units; the row factor rides on q (one rounding)
    q_scaled = (unit(query) * (row_scale(counts, D) / _LN2)[:, None, :, None]).to(query.dtype)
    k_unit = unit(key).to(key.dtype)
    value = value if value.stride(-1) == 1 else value.contiguous()
    out, _ = softplus_fwd(q_scaled, k_unit, value, counts, seg, mode, reweight, power)
    return out
