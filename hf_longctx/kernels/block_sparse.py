"""Triton block-sparse causal attention (prefill), forward and backward, behind ``torch.library`` custom ops.

Entry point: :func:`block_sparse_attention_triton`, with the signature and result of
``hf_longctx.kernels.reference_sparse.block_sparse_attention`` (the selection format is described there:
FlexAttention's kv_num_blocks / kv_indices (masked blocks) and full_kv_num_blocks / full_kv_indices
(mask-free blocks), plus MInference-style per-query-block key columns). Shapes: ``query`` (B, H, S, D),
``key`` / ``value`` (B, H_kv, S, D), H = G * H_kv (GQA in the kernel, K/V never repeated). The result is
(B, H, S, D) in ``query.dtype`` laid out as (B, S, H, D), so ``out.transpose(1, 2)`` is contiguous.

Kernels (log2 units, ``exp2``, as ``sink_window.py``):

* ``_fwd_kernel``: one program per (query block, batch*head), last blocks first. It runs the full-block list
  without any mask, then the partial list with the causal/length mask, then the column list (gathered keys,
  ``BLOCK_C`` at a time). Each listed block is one ``sink_window._fwd_block`` step in dense mode (no sinks,
  no window), the columns use its ``_fwd_probs``. The list loops load the next block index inside the loop,
  so Triton pipelines the K/V loads (one block ahead: the in-loop index load makes them indirect loads for
  Triton's pipeliner). ``_fwd_variant_kernel``: alternative schedules of the same computation (index prefetch
  for a deeper pipeline, TMA loads, GQA-grouped grid), ``FWD_VARIANTS``, selected with :func:`forward_variant`
  (benchmarks/sparse_variants.py, benchmarks/NOTES-sparse.md); "in-loop" is the kernel above, "prefetch" the
  default (1.18x faster at 128K on the H100, results/sparse_variants.md).
* Backward (block lists only; columns have no backward): ``sink_window._bwd_delta_kernel``, then
  ``_bwd_dq_kernel`` (query blocks, the forward's lists) and ``_bwd_dkdv_kernel`` (key blocks, the
  transposed lists built on the device by :func:`transpose_lists`; loops over the G query heads of a KV
  head), both built on ``sink_window``'s ``_dq_inner`` / ``_dkdv_inner`` in dense mode, so no atomics.

Contract (unchecked in the kernel, for speed): every full block lies strictly below its query block's
diagonal; a query block's columns lie outside its listed blocks and are distinct; indices are in range.
bf16 / fp16 on CUDA (fp32 only under the interpreter); head dims ``sink_window.SUPPORTED_HEAD_DIMS``;
``block_size`` a power of two in [16, 128]. Anything else raises ValueError naming the parameter.
"""

from __future__ import annotations

import torch

from . import sink_window as sw
from .schedules import Schedules
from .reference_sparse import block_mask_from_lists, check_block_lists, lists_from_mask

triton, tl = sw.triton, sw.tl

__all__ = ["BLOCK_SIZES", "block_sparse_attention_triton", "transpose_lists", "unsupported_reason"]

BLOCK_SIZES = (16, 32, 64, 128)
_DENSE_WINDOW = sw._DENSE_WINDOW
_LOG2E = sw._LOG2E

if triton is not None:
    from .sink_window import (_bwd_delta_kernel, _dkdv_inner, _dq_inner, _fwd_block, _fwd_probs, _load_kv,
                              _row_tile, _store_dkdv)

    @triton.jit
    def _query_program(K, V, stride_kb, stride_kh, stride_vb, stride_vh, H, G, S, QB, BLOCK: tl.constexpr):
        """A program of the grid (query blocks, B * H), last query blocks first: (batch b, head h, its BLOCK
        query rows (absolute), their causal key bound min(row + 1, S), the (b, h, qb) row of the (B, H, QB)
        list tensors, the base of (b, h) in (B, H, S) tensors, the K and V bases of KV head h // G)."""
        qb = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        k_base = K + b * stride_kb + (h // G) * stride_kh
        v_base = V + b * stride_vb + (h // G) * stride_vh
        return b, h, rows, tl.minimum(rows + 1, S), bh * QB + qb, bh * S, k_base, v_base

    @triton.jit
    def _list_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, idx_ptr, n, rows, kmax, Skv, WINDOW,
                    qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASKED: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        """The ``n`` key blocks listed at ``idx_ptr`` (block indices), in order: ``sink_window._fwd_block`` in
        dense mode (no sinks, ``WINDOW`` past any distance); ``MASKED`` applies the causal / length mask."""
        for e in range(0, n):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                       tl.load(idx_ptr + e) * BLOCK_N, Skv, 0, kmax, rows, 0, WINDOW, qk_scale,
                                       1.0, 1.0, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, False, DOT_PREC, DOT_T)
        return acc, l_i, m_i

    @triton.jit
    def _column_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, col_ptr, n, rows, kmax, Skv, WINDOW,
                      qk_scale, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                      DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        """The ``n`` key columns listed at ``col_ptr`` (positions), ``BLOCK_C`` at a time, causal mask."""
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for t0 in range(0, n, BLOCK_C):
            ok = t0 + offs_c < n
            j = tl.load(col_ptr + t0 + offs_c, mask=ok, other=-1).to(tl.int64)  # -1: never visible
            ld = ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + j[:, None] * stride_ks + offs_d[None, :], mask=ld, other=0.0)
            qk = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
            p, m_new, m_use = _fwd_probs(qk, m_i, j, Skv, 0, kmax, rows, 0, WINDOW, qk_scale, 1.0, 1.0, True, True,
                                         False)
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + j[:, None] * stride_vs + offs_d[None, :], mask=ld, other=0.0)
            acc = tl.dot(p.to(v.dtype).to(DOT_T), v.to(DOT_T), acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["H", "G", "S", "QB", "KVB", "FKVB", "NC", "WINDOW"])
    def _fwd_kernel(Q, K, V, O, LSE, NUM, IDX, FNUM, FIDX, CNUM, CIDX,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                    H, G, S, QB, KVB, FKVB, NC, WINDOW, qk_scale,
                    HAS_FULL: tl.constexpr, HAS_COLS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        b, h, rows, kmax, row, bh_s, k_base, v_base = _query_program(K, V, stride_kb, stride_kh, stride_vb,
                                                                     stride_vh, H, G, S, QB, BLOCK)
        q_ptrs, q_ok = _row_tile(Q, b, h, rows, S, stride_qb, stride_qh, stride_qs, BLOCK_D, HEAD_DIM)
        q = tl.load(q_ptrs, mask=q_ok, other=0.0)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        if HAS_FULL:
            acc, l_i, m_i = _list_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, FIDX + row * FKVB,
                                        tl.load(FNUM + row), rows, kmax, S, WINDOW, qk_scale, BLOCK, BLOCK_D,
                                        HEAD_DIM, False, DOT_PREC, DOT_T)
        acc, l_i, m_i = _list_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, IDX + row * KVB,
                                    tl.load(NUM + row), rows, kmax, S, WINDOW, qk_scale, BLOCK, BLOCK_D, HEAD_DIM,
                                    True, DOT_PREC, DOT_T)
        if HAS_COLS:
            acc, l_i, m_i = _column_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, CIDX + row * NC,
                                          tl.load(CNUM + row), rows, kmax, S, WINDOW, qk_scale, BLOCK_C, BLOCK_D,
                                          HEAD_DIM, DOT_PREC, DOT_T)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))  # +inf: exp2(s - lse) = 0 in the backward
        o_ptrs, _ = _row_tile(O, b, h, rows, S, stride_ob, stride_oh, stride_os, BLOCK_D, HEAD_DIM)
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_ok)
        tl.store(LSE + bh_s + rows, lse, mask=rows < S)

    # ---------------------------------------------------------------------------------- forward variants
    # Alternative forward schedules (FWD_VARIANTS, benchmarks/sparse_variants.py, NOTES-sparse.md). Same
    # contract and results as _fwd_kernel; "in-loop" runs _fwd_kernel itself.
    @triton.jit
    def _variant_program(K, V, stride_kb, stride_kh, stride_vb, stride_vh, H, G, S, QB, BLOCK: tl.constexpr,
                         GROUPED: tl.constexpr):
        """:func:`_query_program` for the variant kernel. ``GROUPED``: grid (query blocks * G, B * H_kv), the G
        query heads of a KV head run side by side (they share K/V blocks in L2), last query blocks first;
        otherwise grid (query blocks, B * H) as _fwd_kernel."""
        if GROUPED:
            qb = tl.num_programs(0) // G - 1 - tl.program_id(0) // G
            bk = tl.program_id(1).to(tl.int64)
            hkv = H // G
            b = bk // hkv
            h = (bk % hkv) * G + tl.program_id(0) % G
            bh = b * H + h
        else:
            qb = tl.num_programs(0) - 1 - tl.program_id(0)
            bh = tl.program_id(1).to(tl.int64)
            b = bh // H
            h = bh % H
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        k_base = K + b * stride_kb + (h // G) * stride_kh
        v_base = V + b * stride_vb + (h // G) * stride_vh
        return b, h, rows, tl.minimum(rows + 1, S), bh * QB + qb, bh * S, k_base, v_base

    @triton.jit
    def _kv_tile(base, desc, start, stride, hi, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
        """Rows [start, start + BLOCK_N) of a K or V head as a [BLOCK_N, BLOCK_D] tile. ``TMA``: one bulk copy
        through the tensor descriptor ``desc`` (rows past the tensor, columns past HEAD_DIM read as zeros);
        otherwise pointer loads (``MASKED``: rows at or past ``hi`` read as zeros)."""
        if TMA:
            t = desc.load([start, 0])
        else:
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            ptrs = base + tl.cast(start, tl.int64) * stride + (offs_n[:, None] * stride + offs_d[None, :])
            if MASKED:
                t = tl.load(ptrs, mask=((start + offs_n) < hi)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            elif BLOCK_D != HEAD_DIM:
                t = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
            else:
                t = tl.load(ptrs)
        return t

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, qk, v, cols, kmax, rows, Skv, WINDOW, qk_scale, MASKED: tl.constexpr,
                    DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        """The online-softmax update of one key block from its scores ``qk`` and values ``v`` (log2 units)."""
        p, m_new, m_use = _fwd_probs(qk, m_i, cols, Skv, 0, kmax, rows, 0, WINDOW, qk_scale, 1.0, 1.0, True, MASKED,
                                     False)
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype).to(DOT_T), v.to(DOT_T), acc * alpha[:, None], input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _list_prefetch(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, idx_ptr, n, rows,
                       kmax, Skv, WINDOW, qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                       TMA: tl.constexpr):
        """The ``n`` key blocks listed at ``idx_ptr``, the NEXT block index loaded one iteration ahead and
        carried: the K/V addresses of an iteration no longer depend on a load of the same iteration, so the
        software pipeliner treats the gathered loads as direct ones and issues them num_stages - 1 blocks ahead
        (the in-loop schedule's in-iteration index load makes them indirect: (num_stages - 1) // 2 blocks ahead,
        one block at num_stages 2 or 3)."""
        offs_n = tl.arange(0, BLOCK_N)
        nxt = tl.load(idx_ptr, mask=n > 0, other=0)
        for e in range(0, n):
            start = nxt * BLOCK_N
            nxt = tl.load(idx_ptr + e + 1, mask=e + 1 < n, other=0)
            k = _kv_tile(k_base, k_desc, start, stride_ks, Skv, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, TMA)
            qk = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
            v = _kv_tile(v_base, v_desc, start, stride_vs, Skv, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, start + offs_n, kmax, rows, Skv, WINDOW, qk_scale,
                                        MASKED, DOT_PREC, DOT_T)
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["H", "G", "S", "QB", "KVB", "FKVB", "NC", "WINDOW"])
    def _fwd_variant_kernel(Q, K, V, O, LSE, NUM, IDX, FNUM, FIDX, CNUM, CIDX,
                            stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                            stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                            H, G, S, QB, KVB, FKVB, NC, WINDOW, qk_scale,
                            HAS_FULL: tl.constexpr, HAS_COLS: tl.constexpr, DOT_PREC: tl.constexpr,
                            DOT_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                            BLOCK_C: tl.constexpr, GROUPED: tl.constexpr, TMA: tl.constexpr):
        """:func:`_fwd_kernel` with both lists run by :func:`_list_prefetch`; ``TMA``: K/V blocks through tensor
        descriptors; ``GROUPED``: the GQA-grouped grid of :func:`_variant_program`."""
        b, h, rows, kmax, row, bh_s, k_base, v_base = _variant_program(K, V, stride_kb, stride_kh, stride_vb,
                                                                       stride_vh, H, G, S, QB, BLOCK, GROUPED)
        q_ptrs, q_ok = _row_tile(Q, b, h, rows, S, stride_qb, stride_qh, stride_qs, BLOCK_D, HEAD_DIM)
        q = tl.load(q_ptrs, mask=q_ok, other=0.0)
        k_desc = None
        v_desc = None
        if TMA:
            k_desc = tl.make_tensor_descriptor(k_base, shape=[S, HEAD_DIM], strides=[stride_ks, 1],
                                               block_shape=[BLOCK, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(v_base, shape=[S, HEAD_DIM], strides=[stride_vs, 1],
                                               block_shape=[BLOCK, BLOCK_D])
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        if HAS_FULL:
            acc, l_i, m_i = _list_prefetch(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
                                           FIDX + row * FKVB, tl.load(FNUM + row), rows, kmax, S, WINDOW, qk_scale,
                                           BLOCK, BLOCK_D, HEAD_DIM, False, DOT_PREC, DOT_T, TMA)
        acc, l_i, m_i = _list_prefetch(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
                                       IDX + row * KVB, tl.load(NUM + row), rows, kmax, S, WINDOW, qk_scale, BLOCK,
                                       BLOCK_D, HEAD_DIM, True, DOT_PREC, DOT_T, TMA)
        if HAS_COLS:
            acc, l_i, m_i = _column_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, CIDX + row * NC,
                                          tl.load(CNUM + row), rows, kmax, S, WINDOW, qk_scale, BLOCK_C, BLOCK_D,
                                          HEAD_DIM, DOT_PREC, DOT_T)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
        o_ptrs, _ = _row_tile(O, b, h, rows, S, stride_ob, stride_oh, stride_os, BLOCK_D, HEAD_DIM)
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_ok)
        tl.store(LSE + bh_s + rows, lse, mask=rows < S)

    @triton.jit(do_not_specialize=["H", "G", "S", "QB", "KVB", "FKVB", "WINDOW"])
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, NUM, IDX, FNUM, FIDX,
                       stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                       stride_dqb, stride_dqh, stride_dqs,
                       H, G, S, QB, KVB, FKVB, WINDOW, qk_scale, sm_scale,
                       HAS_FULL: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
        b, h, rows, kmax, row, bh_s, k_base, v_base = _query_program(K, V, stride_kb, stride_kh, stride_vb,
                                                                     stride_vh, H, G, S, QB, BLOCK)
        q_ptrs, mask = _row_tile(Q, b, h, rows, S, stride_qb, stride_qh, stride_qs, BLOCK_D, HEAD_DIM)
        do_ptrs, _ = _row_tile(DO, b, h, rows, S, stride_dob, stride_doh, stride_dos, BLOCK_D, HEAD_DIM)
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        do = tl.load(do_ptrs, mask=mask, other=0.0)
        lse = tl.load(LSE + bh_s + rows, mask=rows < S, other=float("inf"))
        delta = tl.load(DELTA + bh_s + rows, mask=rows < S, other=0.0)
        dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        pdp = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_FULL:
            for e in range(0, tl.load(FNUM + row)):
                lo = tl.load(FIDX + row * FKVB + e) * BLOCK
                dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo,
                                    lo + BLOCK, 0, kmax, rows, 0, WINDOW, qk_scale, 1.0, 1.0, BLOCK_N,
                                    BLOCK_D, HEAD_DIM, False, False, DOT_PREC, DOT_T, False)
        for e in range(0, tl.load(NUM + row)):
            lo = tl.load(IDX + row * KVB + e) * BLOCK
            dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo,
                                tl.minimum(lo + BLOCK, S), 0, kmax, rows, 0, WINDOW, qk_scale, 1.0, 1.0,
                                BLOCK_N, BLOCK_D, HEAD_DIM, True, False, DOT_PREC, DOT_T, False)
        dq_ptrs, _ = _row_tile(DQ, b, h, rows, S, stride_dqb, stride_dqh, stride_dqs, BLOCK_D, HEAD_DIM)
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["H", "Hkv", "G", "S", "QB", "KVB", "WINDOW"])
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TNUM, TIDX, TFNUM, TFIDX,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                         stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                         H, Hkv, G, S, QB, KVB, WINDOW, qk_scale, sm_scale,
                         HAS_FULL: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
        kb = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // Hkv
        hk = pid_bk % Hkv
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        k, v = _load_kv(K, V, b, hk, cols, S, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        BLOCK_D, HEAD_DIM)
        b64 = b.to(tl.int64)
        dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        for g in range(G):
            h64 = (hk * G + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            lse_base = LSE + (b64 * H + h64) * S
            delta_base = DELTA + (b64 * H + h64) * S
            row = (b64 * H + h64) * KVB + kb  # (b, h, kb) row of the transposed lists
            if HAS_FULL:
                for e in range(0, tl.load(TFNUM + row)):
                    lo = tl.load(TFIDX + row * QB + e) * BLOCK
                    hi = tl.minimum(lo + BLOCK, S)
                    if hi - lo == BLOCK:
                        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs,
                                             stride_dos, 0, lo, hi, cols, 0, S, 0, WINDOW, qk_scale, 1.0,
                                             1.0, BLOCK_M, BLOCK_D, HEAD_DIM, False, False, DOT_PREC, DOT_T)
                    else:  # the last, partial query block
                        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs,
                                             stride_dos, 0, lo, hi, cols, 0, S, 0, WINDOW, qk_scale, 1.0,
                                             1.0, BLOCK_M, BLOCK_D, HEAD_DIM, True, False, DOT_PREC, DOT_T)
            for e in range(0, tl.load(TNUM + row)):
                lo = tl.load(TIDX + row * QB + e) * BLOCK
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                     0, lo, tl.minimum(lo + BLOCK, S), cols, 0, S, 0, WINDOW, qk_scale,
                                     1.0, 1.0, BLOCK_M, BLOCK_D, HEAD_DIM, True, False, DOT_PREC, DOT_T)
        _store_dkdv(DK, DV, dk * sm_scale, dv, b, hk, cols, S, stride_dkb, stride_dkh, stride_dks, stride_dvb,
                    stride_dvh, stride_dvs, BLOCK_D, HEAD_DIM)


def transpose_lists(num: torch.Tensor, indices: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists per query block (B, H, Qb) / (B, H, Qb, N) -> lists per key block (B, H, blocks) /
    (B, H, blocks, Qb): the query blocks that listed each key block, ascending. On the device, no sync."""
    mask = block_mask_from_lists(num, indices, blocks)
    return lists_from_mask(mask.transpose(-1, -2))


def _launch_params(block_size: int, head_dim_p: int) -> dict:
    if sw._interpret():
        return {"fwd": {}, "dq": {"BLOCK_N": block_size}, "dkdv": {"BLOCK_M": block_size}, "cols": 16}
    big = block_size >= 128 or head_dim_p >= 256
    return {"fwd": {"num_warps": 8 if big else 4, "num_stages": 2},
            "dq": {"BLOCK_N": min(32, block_size), "num_warps": 8 if big else 4, "num_stages": 3},
            "dkdv": {"BLOCK_M": min(32, block_size), "num_warps": 8 if big else 4, "num_stages": 2},
            "cols": 64}


# Forward schedules (internal; benchmarks/sparse_variants.py times them side by side, NOTES-sparse.md says what each
# changes and why). "prefetch" is the default: on the H100 at 128K, density 0.1, it runs the kernel in 29.6 ms
# against 34.8 ms for "in-loop" (_fwd_kernel, 2 stages), the fastest of the six (results/sparse_variants.md, where
# "in-loop" is listed under its former name "default").
#   prefetch: both list loops carry the NEXT block index (loaded one iteration ahead), so the K/V loads are direct
#             for triton's pipeliner and go num_stages - 1 = 2 blocks ahead (in-loop: 1 block, the in-loop index
#             load makes them indirect); 3 stages (224 KB of shared memory at block 128, D 128)
#   -s2:      the same loop at 2 stages (1 block ahead): separates the loop change from the deeper pipeline
#   -grouped: grid (query block, head-in-group): the G query heads of a KV head run side by side (shared K/V
#             blocks stay in L2)
#   -tma:     K/V blocks through device-side TMA tensor descriptors (one bulk copy per tile, mbarrier waits)
FWD_VARIANTS = {
    "in-loop": None,
    "prefetch": dict(GROUPED=False, TMA=False, STAGES=3),
    "prefetch-s2": dict(GROUPED=False, TMA=False, STAGES=2),
    "prefetch-grouped": dict(GROUPED=True, TMA=False, STAGES=3),
    "prefetch-tma": dict(GROUPED=False, TMA=True, STAGES=3),
    "prefetch-tma-grouped": dict(GROUPED=True, TMA=True, STAGES=3),
}
_SMEM_BYTES = 227 * 1024  # Hopper's per-block shared memory limit


_FWD_SCHEDULES = Schedules("forward variant", FWD_VARIANTS, "prefetch")
# ``with forward_variant(name):`` runs the forward kernel with another schedule of FWD_VARIANTS (benchmarks, tests)
forward_variant = _FWD_SCHEDULES.use


def _variant_stages(wanted: int, block_size: int, head_dim_p: int, elem: int) -> int:
    """The variant's pipeline depth, lowered to 2 where Q plus ``wanted`` K/V buffers would not fit in shared
    memory (e.g. D 256 at block 128)."""
    tile = block_size * head_dim_p * elem
    return wanted if tile * (1 + 2 * wanted) <= _SMEM_BYTES else 2


def _prep(t: torch.Tensor | None, batch: int, heads: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.expand(batch, heads, *t.shape[2:]).to(torch.int32).contiguous()


def _forward(q, k, v, num, idx, fnum, fidx, cnum, cidx, block_size, scale):
    B, H, S, D, Hkv, _, BLOCK_D, _, qk_scale, _, _, _, prec = sw._common(q, k, -1, scale, 0.0)
    out = torch.empty(B, S, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    if S == 0:
        return out, lse
    params = _launch_params(block_size, BLOCK_D)
    qblocks = triton.cdiv(S, block_size)
    dummy = sw._dummy(q)
    args = (q, k, v, out, lse, num, idx, fnum if fnum is not None else dummy, fidx if fidx is not None else dummy,
            cnum if cnum is not None else dummy, cidx if cidx is not None else dummy,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, H // Hkv, S, qblocks, idx.shape[-1], fidx.shape[-1] if fidx is not None else 1,
            cidx.shape[-1] if cidx is not None else 1, _DENSE_WINDOW, qk_scale)
    meta = dict(HAS_FULL=fnum is not None, HAS_COLS=cnum is not None, DOT_PREC=prec[0], DOT_T=prec[1], HEAD_DIM=D,
                BLOCK_D=BLOCK_D, BLOCK=block_size, BLOCK_C=params["cols"])
    flags = _FWD_SCHEDULES.current
    if flags is None:
        _fwd_kernel[(qblocks, B * H)](*args, **meta, **params["fwd"])
        return out, lse
    G = H // Hkv
    grid = (qblocks * G, B * Hkv) if flags["GROUPED"] else (qblocks, B * H)
    launch = dict(params["fwd"])
    if launch:  # compiled (not the interpreter)
        launch["num_stages"] = _variant_stages(flags["STAGES"], block_size, BLOCK_D, q.element_size())
    _fwd_variant_kernel[grid](*args, **meta, GROUPED=flags["GROUPED"], TMA=flags["TMA"] and sw._tma_ready(k, v),
                              **launch)
    return out, lse


def _backward(do, q, k, v, o, lse, num, idx, fnum, fidx, block_size, scale):
    B, H, S, D, Hkv, _, BLOCK_D, _, qk_scale, _, _, _, prec = sw._common(q, k, -1, scale, 0.0)
    G = H // Hkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if S == 0:
        return dq, dk, dv
    if do.stride(-1) != 1:
        do = do.contiguous()
    params = _launch_params(block_size, BLOCK_D)
    delta = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    bm_delta = 16 if sw._interpret() else 64
    _bwd_delta_kernel[(triton.cdiv(S, bm_delta), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, S, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm_delta, num_warps=4)
    qblocks = triton.cdiv(S, block_size)
    dummy = sw._dummy(q)
    has_full = fnum is not None
    meta = dict(HAS_FULL=has_full, DOT_PREC=prec[0], DOT_T=prec[1], HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK=block_size)
    _bwd_dq_kernel[(qblocks, B * H)](
        q, k, v, do, lse, delta, dq, num, idx, fnum if has_full else dummy, fidx if has_full else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), H, G, S, qblocks, idx.shape[-1],
        fidx.shape[-1] if has_full else 1, _DENSE_WINDOW, qk_scale, scale,
        **meta, **params["dq"])
    tnum, tidx = transpose_lists(num, idx, qblocks)
    tfnum, tfidx = transpose_lists(fnum, fidx, qblocks) if has_full else (dummy, dummy)
    _bwd_dkdv_kernel[(qblocks, B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, tnum, tidx, tfnum, tfidx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, Hkv, G, S, qblocks, qblocks, _DENSE_WINDOW, qk_scale, scale, **meta, **params["dkdv"])
    return dq, dk, dv


@torch.library.custom_op("hf_longctx::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                     kv_indices: torch.Tensor, full_kv_num_blocks: torch.Tensor | None,
                     full_kv_indices: torch.Tensor | None, column_count: torch.Tensor | None,
                     column_index: torch.Tensor | None, block_size: int, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, H, S, D) laid out as (B, S, H, D), lse (B, H, S) fp32 in log2 units, +inf if empty).
    The lists are int32, contiguous, with the query-head dimension H."""
    return _forward(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, column_count,
                    column_index, block_size, scale)


@block_sparse_fwd.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, column_count, column_index,
      block_size, scale):
    B, H, S, D = q.shape
    return q.new_empty(B, S, H, D).transpose(1, 2), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("hf_longctx::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                     full_kv_num_blocks: torch.Tensor | None, full_kv_indices: torch.Tensor | None,
                     block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`block_sparse_fwd` without columns: (dq, dk, dv)."""
    return _backward(do, q, k, v, o, lse, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                     block_size, scale)


@block_sparse_bwd.register_fake
def _(do, q, k, v, o, lse, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, num, idx, fnum, fidx, cnum, cidx, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, num, idx, fnum, fidx)
    ctx.params = (block_size, scale)
    ctx.has_cols = cnum is not None


def _backward_fn(ctx, grad_out, grad_lse):
    if ctx.has_cols:
        raise ValueError("block_sparse_attention: the backward supports block lists only (column_count / "
                         "column_index have no gradient path); train with block top-k selections")
    q, k, v, out, lse, num, idx, fnum, fidx = ctx.saved_tensors
    dq, dk, dv = block_sparse_bwd(grad_out, q, k, v, out, lse, num, idx, fnum, fidx, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("hf_longctx::block_sparse_fwd", _backward_fn, setup_context=_setup_context)


def unsupported_reason(query, key, value, block_size: int = 128, scale=None) -> str | None:
    """Why the Triton path cannot run these inputs (a message naming the parameter), or None."""
    reason = sw.unsupported_reason(query, key, value, scale=scale)
    if reason is not None:
        return reason
    if query.shape[2] != key.shape[2]:
        return f"query length ({query.shape[2]}) must equal key length ({key.shape[2]}): block-sparse is prefill"
    if block_size not in BLOCK_SIZES:
        return f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}"
    return None


def block_sparse_attention_triton(query, key, value, kv_num_blocks, kv_indices, *, full_kv_num_blocks=None,
                                  full_kv_indices=None, column_count=None, column_index=None,
                                  block_size: int = 128, scale: float | None = None,
                                  query_chunk_blocks: int | None = None, key_chunk: int | None = None,
                                  return_lse: bool = False):
    """Block-sparse causal attention (Triton), same contract as ``reference_sparse.block_sparse_attention``
    (whose tile sizes ``query_chunk_blocks`` / ``key_chunk`` are accepted and ignored). Differentiable in
    query, key and value when no columns are given (the returned LSE is detached). Unsupported input ->
    ValueError."""
    reason = unsupported_reason(query, key, value, block_size, scale)
    if reason is not None:
        raise ValueError(f"block_sparse_attention_triton: {reason}")
    B, H, S, D = query.shape
    qblocks = -(-S // block_size)
    check_block_lists("kv_num_blocks/kv_indices", kv_num_blocks, kv_indices, B, H, qblocks)
    if (full_kv_num_blocks is None) != (full_kv_indices is None):
        raise ValueError("full_kv_num_blocks and full_kv_indices go together")
    if full_kv_num_blocks is not None:
        check_block_lists("full_kv_num_blocks/full_kv_indices", full_kv_num_blocks, full_kv_indices, B, H, qblocks)
    if (column_count is None) != (column_index is None):
        raise ValueError("column_count and column_index go together")
    if column_count is not None:
        check_block_lists("column_count/column_index", column_count, column_index, B, H, qblocks)
    lists = [_prep(t, B, H) for t in (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                      column_count, column_index)]
    scale = float(D ** -0.5 if scale is None else scale)
    out, lse = block_sparse_fwd(sw._last_dim_contiguous(query), sw._last_dim_contiguous(key),
                                sw._last_dim_contiguous(value), *lists, int(block_size), scale)
    if not return_lse:
        return out
    # the LSE is returned detached: the backward has no gradient path for it
    return out, torch.where(lse == float("inf"), float("-inf"), lse.detach() * (1 / _LOG2E))
