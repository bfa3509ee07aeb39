"""Triton sink/window attention, forward and backward, behind ``torch.library`` custom ops.

Key ``j`` is visible from query ``i`` iff ``j <= i`` and (``j < sink_tokens`` or ``i - j < window``),
counted in *logical* positions: the index of a token among the real tokens of its sequence (padding
and other packed sequences do not count). ``window=None`` is plain causal attention.

Entry point: :func:`sink_window_attention_triton`, with the signature and result of
``hf_longctx.kernels.reference.sink_window_attention``. Shapes: ``query`` (B, H, Sq, D), ``key`` and
``value`` (B, H_kv, Skv, D) with H = G * H_kv (GQA is handled in the kernel, K/V are never repeated);
the queries are the LAST Sq of the Skv positions (chunked prefill, decode). The result is
(B, H, Sq, D) in ``query.dtype``; its memory is laid out as (B, Sq, H, D), so ``out.transpose(1, 2)``
is contiguous for free.

Kernels (all work in log2 units: scores are multiplied by ``scale * log2(e)`` and use ``exp2``):

* ``_fwd_kernel``: one program per (query block, batch*head). It visits only the key blocks that
  meet the sinks or the window, in five runs: sink blocks without a mask, the sink remainder with a
  mask, the lower edge of the window with a mask, the inside of the window without a mask, and the
  causal diagonal with a mask. Alternative schedules (one loop with a per-block mask switch, TMA loads,
  GQA-grouped grid order, 256-row blocks) are internal variants, ``FWD_VARIANTS``,
  selected with :func:`forward_variant` (benchmarks/sink_variants.py); "default" is the schedule above.
* ``_fwd_split_kernel`` + ``_split_combine_kernel``: decode / short chunks (Sq <= 16). One program per
  (split of the visited keys, batch*kv-head); the G query heads that share a KV head are the rows of
  one tile, so K/V are read once per KV head. Partial results are merged by a second kernel (with one
  split, the split kernel writes the final rows itself). Without autograd the launcher is called directly,
  not through the custom op (its dispatch dominated the per-call time of decode).
* Backward: ``_bwd_delta_kernel`` (delta = rowsum(o * do)), ``_bwd_dq_kernel`` (query blocks, same
  visiting plan as the forward) and ``_bwd_dkdv_kernel`` (key blocks; loops over the G query heads of
  the group and over the query rows that see the block: all later rows for a sink block, rows up to
  ``window`` past it otherwise), so dk/dv need no atomics.

Masks (``kv_valid``, ``segment_ids``) become *segments* on the host: each segment has a batch row, a
query range [q_lo, q_hi) and a span of valid keys [k_lo, k_hi) (absolute indices along Skv). The
logical index of a key is ``j - k_lo``; that of a query is ``clamp(i - k_lo, 0, k_hi - k_lo)`` (the
number of valid keys before it). Modes: 0 = no mask; 1 = one span per batch row (padding);
2 = packed sequences (a work table maps programs to (segment, block)). The decode path also takes a mode-1
mask with holes (speculative decoding leaves its rejected draft slots as holes): the span is then the
envelope of the real keys, and each slot's logical index (-1 for a hole) and the slot bounds of the sinks and
the window come from :func:`hole_layout`.

Contract: bf16 / fp16 on CUDA (fp32 accumulation; fp32 inputs only under the interpreter), head dims
``SUPPORTED_HEAD_DIMS``; anything unsupported raises ValueError naming the parameter (see
:func:`unsupported_reason`), never a silent fallback. ``kv_valid`` costs one host sync (the check for
holes) except on the decode path without autograd (converted on the device by :func:`hole_layout`), and
``segment_ids`` one (the number of segments); :func:`sink_window_attention_segments` takes
the converted masks and does neither. Autotuning (on first use per length bucket) can be limited to
the first config of each kernel with ``HF_LONGCTX_AUTOTUNE=0``; :func:`tuned_configs` reports choices.

This module imports without a GPU: triton is imported under a guard; kernels are only launched for
CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
"""

from __future__ import annotations

import math
import os

import torch

from .schedules import Schedules

try:  # triton is optional at import time (CPU-only installs)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    triton = None
    tl = None

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "is_available",
    "unsupported_reason",
    "hole_layout",
    "kv_valid_to_spans",
    "segment_table",
    "takes_holes",
    "sink_window_attention_triton",
    "sink_window_attention_segments",
    "tuned_configs",
]

SUPPORTED_HEAD_DIMS = (32, 48, 64, 96, 128, 256)
_DENSE_WINDOW = 1 << 30  # "no window": larger than any distance, small enough for int32 sums
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Block sizes used under the Triton interpreter (CPU tests). Tests may change them.
INTERPRET_BLOCKS = {"fwd_m": 16, "fwd_n": 16, "dq_m": 16, "dq_n": 16, "dkdv_m": 16, "dkdv_n": 16,
                    "split_n": 16, "split_min_keys": 16}
# Decode path: used when Sq <= _SPLIT_MAX_SQ and G * Sq <= _SPLIT_MAX_ROWS (modes 0 and 1).
_SPLIT_MAX_SQ = 16
_SPLIT_MAX_ROWS = 128
_SPLIT_MIN_KEYS = 256


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_CAPABILITY: dict = {}


def _capability(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0]
    return _CAPABILITY[index]


def is_available() -> bool:
    """True when Triton can launch kernels here: a CUDA GPU (sm80+), or the interpreter."""
    if triton is None:
        return False
    if _interpret():
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh(x) = 1 - 2 / (exp(2x) + 1); exact limits at +-inf, no libdevice needed.
        e = tl.exp2(x * 2.8853900817779268)
        return 1.0 - 2.0 / (e + 1.0)

    @triton.jit
    def _program_segment(pid_blk, pid_head, SEG, WORK, NH, Sq, Skv, MODE: tl.constexpr):
        """(block, b, head, q_lo, q_hi, k_lo, k_hi) of one program; an empty range for idle ones.

        MODE 0/1: grid (blocks, B * NH), blocks taken in reverse (longest first).
        MODE 2: grid (work items, NH); WORK[w] = (segment or -1, block), SEG[s] = (b, q_lo, q_hi, k_lo, k_hi).
        """
        if MODE == 2:
            seg = tl.load(WORK + pid_blk * 2)
            blk = tl.load(WORK + pid_blk * 2 + 1)
            live = seg >= 0
            segc = tl.maximum(seg, 0)
            b = tl.load(SEG + segc * 5)
            q_lo = tl.where(live, tl.load(SEG + segc * 5 + 1), 0)
            q_hi = tl.where(live, tl.load(SEG + segc * 5 + 2), 0)
            k_lo = tl.where(live, tl.load(SEG + segc * 5 + 3), 0)
            k_hi = tl.where(live, tl.load(SEG + segc * 5 + 4), 0)
            head = pid_head
        else:
            blk = pid_blk
            b = pid_head // NH
            head = pid_head % NH
            q_lo = Skv - Sq
            q_hi = Skv
            if MODE == 1:
                k_lo = tl.load(SEG + b * 2)
                k_hi = tl.load(SEG + b * 2 + 1)
            else:
                k_lo = 0
                k_hi = Skv
        return blk, b, head, q_lo, q_hi, k_lo, k_hi

    @triton.jit
    def _query_plan(r0, q_hi, k_lo, k_hi, SINK, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key runs visited by the query rows [r0, r0 + BLOCK_M) (absolute indices).

        Returns the boundaries k_lo <= sink_full_end <= sink_end, win_lo <= low_end <= mid_end <= kend:
        [k_lo, sink_full_end) sinks seen by every row (no mask), [sink_full_end, sink_end) sink rest,
        [win_lo, low_end) lower window edge, [low_end, mid_end) inside (no mask), [mid_end, kend) diagonal.
        """
        n_k = k_hi - k_lo
        r_last = tl.minimum(r0 + BLOCK_M, q_hi) - 1
        L_first = tl.minimum(tl.maximum(r0 - k_lo, 0), n_k)
        L_last = tl.minimum(tl.maximum(r_last - k_lo, 0), n_k)
        kend = tl.minimum(r_last + 1, k_hi)
        sink_end = tl.maximum(tl.minimum(k_lo + SINK, kend), k_lo)
        full_hi = tl.minimum(r0 + 1, k_hi)  # keys below are causal-visible to every row
        n_sink_full = tl.maximum(tl.minimum(sink_end, full_hi) - k_lo, 0) // BLOCK_N
        sink_full_end = k_lo + n_sink_full * BLOCK_N
        win_lo = tl.maximum(k_lo + L_first - WINDOW + 1, sink_end)
        full_lo = tl.maximum(win_lo, k_lo + L_last - WINDOW + 1)  # keys above are in every row's window
        low_end = tl.minimum(win_lo + tl.cdiv(full_lo - win_lo, BLOCK_N) * BLOCK_N, kend)
        low_end = tl.maximum(low_end, win_lo)
        n_mid = tl.maximum(full_hi - low_end, 0) // BLOCK_N
        mid_end = low_end + n_mid * BLOCK_N
        return sink_full_end, sink_end, win_lo, low_end, mid_end, kend

    @triton.jit
    def _visible(cols, hi, k_lo, kmax, L, SINK, WINDOW):
        """(rows, cols) visibility of the keys ``cols`` (absolute, below ``hi``) from rows of logical index
        ``L`` and causal bound ``kmax`` (both per row)."""
        rel = cols - k_lo
        col_ok = (cols < hi) & (rel >= 0)
        return (cols[None, :] < kmax[:, None]) & col_ok[None, :] & (
            (rel < SINK)[None, :] | (L[:, None] - rel[None, :] < WINDOW))

    @triton.jit
    def _fwd_probs(qk, m_i, cols, hi, k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out, masked,
                   MAY_MASK: tl.constexpr, SOFTCAP: tl.constexpr):
        """Online-softmax step of one key block: (p, new row max, the max subtracted), log2 units.

        ``MAY_MASK``: the block can need the mask (compile time); ``masked``: it does (a runtime switch in
        the fused loop, the constant True elsewhere). Only the tile's mask sits under the runtime switch:
        triton 3.6's software pipeliner fails (PassManager::run failed) on a loop whose ``if`` also holds
        the row max and exp2 (benchmarks/NOTES-sink-kernel.md).
        """
        if SOFTCAP:
            s = _tanh(qk * cap_in) * cap_out
            sc = 1.0
        else:  # scale > 0: max(qk) * scale is the row max of the scores; one FMA per element
            s = qk
            sc = qk_scale
        if MAY_MASK:
            if masked:
                s = tl.where(_visible(cols, hi, k_lo, kmax, L, SINK, WINDOW), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
            m_use = m_new
        p = tl.exp2(s * sc - m_use[:, None])
        return p, m_new, m_use

    @triton.jit
    def _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, hi,
                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                   MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        """Online-softmax step over the keys [start, start + BLOCK_N): acc [BLOCK_M, BLOCK_D], l_i / m_i
        [BLOCK_M] updated (log2 units). ``MASKED``: keys at or past ``hi`` read as zeros and the visibility
        mask of :func:`_visible` applies; otherwise every key of the block is visible to every row."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
        v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
        start64 = tl.cast(start, tl.int64)
        cols = start + offs_n
        if MASKED:
            ld = (cols < hi)[:, None] & d_ok[None, :]
            k = tl.load(k_base + start64 * stride_kn + k_tile, mask=ld, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_base + start64 * stride_kn + k_tile, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_base + start64 * stride_kn + k_tile)
        qk = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
        p, m_new, m_use = _fwd_probs(qk, m_i, cols, hi, k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                     True, MASKED, SOFTCAP)
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + start64 * stride_vn + v_tile, mask=ld, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_base + start64 * stride_vn + v_tile, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + start64 * stride_vn + v_tile)
        acc = tl.dot(p.to(v.dtype).to(DOT_T), v.to(DOT_T), acc, input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi,
                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                   MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        for start in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, hi,
                                       k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                       BLOCK_N, BLOCK_D, HEAD_DIM, MASKED, SOFTCAP, DOT_PREC, DOT_T)
        return acc, l_i, m_i

    @triton.jit
    def _finish(acc, l_i, m_i, S_AUX, h, HAS_SAUX: tl.constexpr):
        """Normalised rows and their LSE (log2 units; +inf for a row without keys), s_aux[h] folded in."""
        if HAS_SAUX:
            sa = tl.load(S_AUX + h).to(tl.float32) * 1.4426950408889634
            m_fin = tl.maximum(m_i, sa)
            alpha = tl.exp2(m_i - m_fin)
            l_tot = l_i * alpha + tl.exp2(sa - m_fin)
            out = acc * (alpha / l_tot)[:, None]
            lse = m_fin + tl.log2(l_tot)
        else:
            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            out = acc / l_safe[:, None]
            lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
        return out, lse

    @triton.jit
    def _fwd_runs(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_lo, sink_full_end, sink_end,
                  win_lo, low_end, mid_end, kend, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        """The five runs of :func:`_query_plan`, each its own loop (masked runs / mask-free runs)."""
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_lo, sink_full_end,
                                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                   BLOCK_N, BLOCK_D, HEAD_DIM, False, SOFTCAP, DOT_PREC, DOT_T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, sink_full_end, sink_end,
                                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                   BLOCK_N, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, win_lo, low_end,
                                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                   BLOCK_N, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, low_end, mid_end,
                                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                   BLOCK_N, BLOCK_D, HEAD_DIM, False, SOFTCAP, DOT_PREC, DOT_T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mid_end, kend,
                                   k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                   BLOCK_N, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T)
        return acc, l_i, m_i

    @triton.jit
    def _fwd_fused(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, k_lo,
                   sink_full_end, sink_end, win_lo, low_end, mid_end, kend, kmax, L, SINK, WINDOW,
                   qk_scale, cap_in, cap_out, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                   TMA: tl.constexpr):
        """The five runs of :func:`_query_plan` as ONE loop (one software pipeline instead of five): the
        sink blocks, then the window blocks; a per-block switch applies the mask or skips it.
        ``TMA``: K/V blocks come through tensor descriptors (rows past the tensor read as zeros)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
        v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
        n_sink = tl.cdiv(sink_end - k_lo, BLOCK_N)
        n_total = n_sink + tl.cdiv(tl.maximum(kend - win_lo, 0), BLOCK_N)
        for t in range(0, n_total):
            in_sink = t < n_sink
            start = tl.where(in_sink, k_lo + t * BLOCK_N, win_lo + (t - n_sink) * BLOCK_N)
            hi = tl.where(in_sink, sink_end, kend)
            masked = tl.where(in_sink, start >= sink_full_end, (start < low_end) | (start >= mid_end))
            start64 = tl.cast(start, tl.int64)
            cols = start + offs_n
            ld = (cols < hi)[:, None] & d_ok[None, :]
            if TMA:
                k = k_desc.load([start, 0])
            else:
                k = tl.load(k_base + start64 * stride_kn + k_tile, mask=ld, other=0.0)
            qk = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
            p, m_new, m_use = _fwd_probs(qk, m_i, cols, hi, k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                                         masked, True, SOFTCAP)
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if TMA:
                v = v_desc.load([start, 0])
            else:
                v = tl.load(v_base + start64 * stride_vn + v_tile, mask=ld, other=0.0)
            acc = tl.dot(p.to(v.dtype).to(DOT_T), v.to(DOT_T), acc, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["H", "G", "Sq", "Skv", "SINK", "WINDOW", "SQ_BUCKET"])
    def _fwd_kernel(Q, K, V, O, LSE, S_AUX, SEG, WORK,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                    H, G, Sq, Skv, SINK, WINDOW, qk_scale, cap_in, cap_out, SQ_BUCKET,
                    MODE: tl.constexpr, HAS_SAUX: tl.constexpr, SOFTCAP: tl.constexpr,
                    DOT_PREC: tl.constexpr, DOT_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    FUSED: tl.constexpr, TMA: tl.constexpr, GROUPED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_blk = tl.program_id(0)
        pid_head = tl.program_id(1)
        if GROUPED:  # MODE 0/1, grid (blocks * G, B * H_kv): the G heads of a KV head run side by side
            pid_blk = tl.num_programs(0) // G - 1 - pid_blk // G  # longest rows first
            pid_head = (pid_head // (H // G)) * H + (pid_head % (H // G)) * G + tl.program_id(0) % G
        elif MODE != 2:
            pid_blk = tl.num_programs(0) - 1 - pid_blk  # longest rows first
        blk, b, h, q_lo, q_hi, k_lo, k_hi = _program_segment(pid_blk, pid_head, SEG, WORK, H,
                                                             Sq, Skv, MODE)
        hk = h // G
        q_off = Skv - Sq  # absolute index of query row 0
        r0 = q_lo + blk * BLOCK_M
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rows = r0 + offs_m
        row_ok = rows < q_hi
        d_ok = offs_d < HEAD_DIM
        n_k = k_hi - k_lo
        L = tl.minimum(tl.maximum(rows - k_lo, 0), n_k)
        kmax = tl.minimum(rows + 1, k_hi)

        b64 = b.to(tl.int64)
        q_rows = (rows - q_off).to(tl.int64)
        q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

        sink_full_end, sink_end, win_lo, low_end, mid_end, kend = _query_plan(
            r0, q_hi, k_lo, k_hi, SINK, WINDOW, BLOCK_M, BLOCK_N)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if FUSED:
            k_desc = None
            v_desc = None
            if TMA:
                k_desc = tl.make_tensor_descriptor(k_base, shape=[Skv, HEAD_DIM], strides=[stride_ks, 1],
                                                   block_shape=[BLOCK_N, BLOCK_D])
                v_desc = tl.make_tensor_descriptor(v_base, shape=[Skv, HEAD_DIM], strides=[stride_vs, 1],
                                                   block_shape=[BLOCK_N, BLOCK_D])
            acc, l_i, m_i = _fwd_fused(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
                                       k_lo, sink_full_end, sink_end, win_lo, low_end, mid_end, kend, kmax, L,
                                       SINK, WINDOW, qk_scale, cap_in, cap_out, BLOCK_N, BLOCK_D, HEAD_DIM,
                                       SOFTCAP, DOT_PREC, DOT_T, TMA)
        else:
            acc, l_i, m_i = _fwd_runs(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, k_lo,
                                      sink_full_end, sink_end, win_lo, low_end, mid_end, kend, kmax, L,
                                      SINK, WINDOW, qk_scale, cap_in, cap_out, BLOCK_N, BLOCK_D, HEAD_DIM,
                                      SOFTCAP, DOT_PREC, DOT_T)

        out, lse = _finish(acc, l_i, m_i, S_AUX, h, HAS_SAUX)
        o_ptrs = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_rows[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse_ptrs = LSE + (b64 * H + h) * Sq + q_rows
        tl.store(lse_ptrs, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["H", "Hkv", "G", "Sq", "Skv", "NSPLIT", "SINK", "WINDOW"])
    def _fwd_split_kernel(Q, K, V, OP, LP, SEG, KPOS, BOUNDS, O, LSE, S_AUX,
                          stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                          stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                          H, Hkv, G, Sq, Skv, NSPLIT, SINK, WINDOW, qk_scale, cap_in, cap_out,
                          DIRECT: tl.constexpr, HAS_SAUX: tl.constexpr, HOLES: tl.constexpr,
                          MODE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_s = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // Hkv
        hk = pid_bk % Hkv
        if MODE == 1:
            k_lo = tl.load(SEG + b * 2)
            k_hi = tl.load(SEG + b * 2 + 1)
        else:
            k_lo = 0
            k_hi = Skv
        n_k = k_hi - k_lo
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < HEAD_DIM
        g = offs_r // Sq
        i = offs_r % Sq
        r_ok = offs_r < G * Sq
        h = hk * G + g
        rows = Skv - Sq + i
        if HOLES:  # the query rows' slots start where BOUNDS says (a static block of speculative decoding)
            rows = tl.load(BOUNDS + b * 4 + 3) + i
        kmax = tl.minimum(rows + 1, k_hi)
        kend = tl.minimum(Skv, k_hi)
        # the union of the keys seen by the Sq query rows: sinks, then the window (slot ranges)
        if HOLES:  # logical indices from KPOS (-1 for a hole), slot bounds and real count from BOUNDS (hole_layout)
            inside = rows < k_hi  # a query past the span (a static step's) sees every real key
            L = tl.load(KPOS + b.to(tl.int64) * Skv + rows, mask=r_ok & inside, other=0)
            L = tl.where(inside, L, tl.load(BOUNDS + b * 4 + 2))
            sink_end = tl.load(BOUNDS + b * 4)
            win_lo = tl.maximum(tl.load(BOUNDS + b * 4 + 1), sink_end)
        else:
            L = tl.minimum(tl.maximum(rows - k_lo, 0), n_k)
            sink_end = tl.maximum(tl.minimum(k_lo + SINK, kend), k_lo)
            L_first = tl.minimum(tl.maximum(Skv - Sq - k_lo, 0), n_k)
            win_lo = tl.maximum(k_lo + L_first - WINDOW + 1, sink_end)
        n_s = sink_end - k_lo
        n_w = tl.maximum(kend - win_lo, 0)
        total = n_s + n_w
        chunk = tl.cdiv(tl.cdiv(total, NSPLIT), BLOCK_N) * BLOCK_N
        t0 = pid_s * chunk
        t1 = tl.minimum(t0 + chunk, total)

        b64 = b.to(tl.int64)
        q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64)[:, None] * stride_qh
                  + i.to(tl.int64)[:, None] * stride_qs + offs_d[None, :])
        q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for t in range(t0, t1, BLOCK_N):
            tt = t + offs_n
            t_ok = tt < t1
            j = tl.where(tt < n_s, k_lo + tt, win_lo + tt - n_s)
            j64 = j.to(tl.int64)
            ld = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + j64[:, None] * stride_ks + offs_d[None, :], mask=ld, other=0.0)
            qk = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
            if SOFTCAP:
                s = _tanh(qk * cap_in) * cap_out
            else:
                s = qk * qk_scale
            if HOLES:
                rel = tl.load(KPOS + b64 * Skv + j64, mask=t_ok, other=-1)
            else:
                rel = j - k_lo
            vis = (j[None, :] < kmax[:, None]) & (t_ok & (rel >= 0))[None, :] & (
                (rel < SINK)[None, :] | (L[:, None] - rel[None, :] < WINDOW))
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + j64[:, None] * stride_vs + offs_d[None, :], mask=ld, other=0.0)
            acc = tl.dot(p.to(v.dtype).to(DOT_T), v.to(DOT_T), acc, input_precision=DOT_PREC)
            m_i = m_new

        if DIRECT:  # one split: this program writes the final rows (no combine kernel)
            out, lse = _finish(acc, l_i, m_i, S_AUX, h, HAS_SAUX)
            o_ptrs = (O + b64 * stride_ob + h.to(tl.int64)[:, None] * stride_oh + i.to(tl.int64)[:, None] * stride_os
                      + offs_d[None, :])
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
            tl.store(LSE + (b64 * H + h) * Sq + i, lse, mask=r_ok)
        else:
            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            out = acc / l_safe[:, None]
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            part = ((b64 * H + h) * NSPLIT + pid_s) * Sq + i  # (B, H, NSPLIT, Sq) row index
            tl.store(OP + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
            tl.store(LP + part, lse, mask=r_ok)

    @triton.jit(do_not_specialize=["H", "Sq", "NSPLIT"])
    def _split_combine_kernel(OP, LP, O, LSE, S_AUX, stride_ob, stride_oh, stride_os,
                              H, Sq, NSPLIT, HAS_SAUX: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)  # over B * H * Sq
        i = pid % Sq
        bh = pid // Sq
        h = bh % H
        b = bh // H
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < NSPLIT
        d_ok = offs_d < HEAD_DIM
        part = (bh.to(tl.int64) * NSPLIT + offs_s) * Sq + i
        lse_s = tl.load(LP + part, mask=s_ok, other=float("-inf"))
        m = tl.max(lse_s, 0)
        if HAS_SAUX:
            sa = tl.load(S_AUX + h).to(tl.float32) * 1.4426950408889634
            m = tl.maximum(m, sa)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse_s - m_safe)
        o_s = tl.load(OP + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      other=0.0)
        num = tl.sum(w[:, None] * o_s, 0)
        den = tl.sum(w, 0)
        if HAS_SAUX:
            den = den + tl.exp2(sa - m_safe)
        out = num / tl.where(den == 0.0, 1.0, den)
        lse = tl.where(den == 0.0, float("inf"), m_safe + tl.log2(tl.where(den == 0.0, 1.0, den)))
        o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_os + offs_d
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_ok)
        tl.store(LSE + bh.to(tl.int64) * Sq + i, lse)

    @triton.jit(do_not_specialize=["H", "Sq"])
    def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
                          H, Sq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows64 = rows.to(tl.int64)
        o = tl.load(O + b * stride_ob + h * stride_oh + rows64[:, None] * stride_os + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_db + h * stride_dh + rows64[:, None] * stride_ds + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + (b * H + h) * Sq + rows64, tl.sum(o * do, 1), mask=rows < Sq)

    @triton.jit
    def _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, lo, hi,
                  k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                  ROW_PDP: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
        v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
        for start in range(lo, hi, BLOCK_N):
            start64 = tl.cast(start, tl.int64)
            cols = start + offs_n
            if MASKED:
                ld = (cols < hi)[:, None] & d_ok[None, :]
                k = tl.load(k_base + start64 * stride_kn + k_tile, mask=ld, other=0.0)
                v = tl.load(v_base + start64 * stride_vn + v_tile, mask=ld, other=0.0)
            elif BLOCK_D != HEAD_DIM:
                k = tl.load(k_base + start64 * stride_kn + k_tile, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_base + start64 * stride_vn + v_tile, mask=d_ok[None, :], other=0.0)
            else:
                k = tl.load(k_base + start64 * stride_kn + k_tile)
                v = tl.load(v_base + start64 * stride_vn + v_tile)
            qk = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
            if SOFTCAP:
                t = _tanh(qk * cap_in)
                s = t * cap_out
            else:
                s = qk * qk_scale
            if MASKED:
                s = tl.where(_visible(cols, hi, k_lo, kmax, L, SINK, WINDOW), s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T)), input_precision=DOT_PREC)
            if ROW_PDP:  # sum_j p_ij dp_ij in fp32: an exact delta for the s_aux gradient
                pdp += tl.sum(p * dp, 1)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = tl.dot(ds.to(k.dtype).to(DOT_T), k.to(DOT_T), dq, input_precision=DOT_PREC)
        return dq, pdp

    @triton.jit(do_not_specialize=["H", "G", "Sq", "Skv", "SINK", "WINDOW", "SQ_BUCKET"])
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PDP, SEG, WORK,
                       stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                       stride_dqb, stride_dqh, stride_dqs,
                       H, G, Sq, Skv, SINK, WINDOW, qk_scale, sm_scale, cap_in, cap_out, SQ_BUCKET,
                       MODE: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_PDP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_blk = tl.program_id(0)
        if MODE != 2:
            pid_blk = tl.num_programs(0) - 1 - pid_blk
        blk, b, h, q_lo, q_hi, k_lo, k_hi = _program_segment(pid_blk, tl.program_id(1), SEG, WORK, H,
                                                             Sq, Skv, MODE)
        hk = h // G
        q_off = Skv - Sq
        r0 = q_lo + blk * BLOCK_M
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rows = r0 + offs_m
        row_ok = rows < q_hi
        d_ok = offs_d < HEAD_DIM
        n_k = k_hi - k_lo
        L = tl.minimum(tl.maximum(rows - k_lo, 0), n_k)
        kmax = tl.minimum(rows + 1, k_hi)

        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_rows = (rows - q_off).to(tl.int64)
        mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + q_rows[:, None] * stride_dos + offs_d[None, :],
                     mask=mask, other=0.0)
        lse = tl.load(LSE + (b64 * H + h64) * Sq + q_rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + (b64 * H + h64) * Sq + q_rows, mask=row_ok, other=0.0)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

        sink_full_end, sink_end, win_lo, low_end, mid_end, kend = _query_plan(
            r0, q_hi, k_lo, k_hi, SINK, WINDOW, BLOCK_M, BLOCK_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
        dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, k_lo, sink_full_end,
                       k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                       BLOCK_N, BLOCK_D, HEAD_DIM, False, SOFTCAP, DOT_PREC, DOT_T, ROW_PDP)
        dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, sink_full_end, sink_end,
                       k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                       BLOCK_N, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T, ROW_PDP)
        dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, win_lo, low_end,
                       k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                       BLOCK_N, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T, ROW_PDP)
        dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, low_end, mid_end,
                       k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                       BLOCK_N, BLOCK_D, HEAD_DIM, False, SOFTCAP, DOT_PREC, DOT_T, ROW_PDP)
        dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, mid_end, kend,
                       k_lo, kmax, L, SINK, WINDOW, qk_scale, cap_in, cap_out,
                       BLOCK_N, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T, ROW_PDP)
        dq = dq * sm_scale
        if ROW_PDP:
            tl.store(PDP + (b64 * H + h64) * Sq + q_rows, pdp, mask=row_ok)
        tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + q_rows[:, None] * stride_dqs + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mask)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, q_off,
                    lo, hi, cols, k_lo, k_hi, SINK, WINDOW, qk_scale, cap_in, cap_out,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_T: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_tile = offs_m[:, None] * stride_qs + offs_d[None, :]
        do_tile = offs_m[:, None] * stride_dos + offs_d[None, :]
        n_k = k_hi - k_lo
        for start in range(lo, hi, BLOCK_M):
            qr64 = tl.cast(start - q_off, tl.int64)
            rows = start + offs_m
            if MASKED:
                row_ok = rows < hi
                ld = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + qr64 * stride_qs + q_tile, mask=ld, other=0.0)
                do = tl.load(do_base + qr64 * stride_dos + do_tile, mask=ld, other=0.0)
                lse = tl.load(lse_base + qr64 + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(delta_base + qr64 + offs_m, mask=row_ok, other=0.0)
            elif BLOCK_D != HEAD_DIM:
                q = tl.load(q_base + qr64 * stride_qs + q_tile, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_base + qr64 * stride_dos + do_tile, mask=d_ok[None, :], other=0.0)
                lse = tl.load(lse_base + qr64 + offs_m)
                delta = tl.load(delta_base + qr64 + offs_m)
            else:
                q = tl.load(q_base + qr64 * stride_qs + q_tile)
                do = tl.load(do_base + qr64 * stride_dos + do_tile)
                lse = tl.load(lse_base + qr64 + offs_m)
                delta = tl.load(delta_base + qr64 + offs_m)
            qkT = tl.dot(k.to(DOT_T), tl.trans(q.to(DOT_T)), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            if SOFTCAP:
                t = _tanh(qkT * cap_in)
                sT = t * cap_out
            else:
                sT = qkT * qk_scale
            if MASKED:
                L = tl.minimum(tl.maximum(rows - k_lo, 0), n_k)
                kmax = tl.minimum(rows + 1, k_hi)
                rel = cols - k_lo
                vis = (cols[:, None] < kmax[None, :]) & (rel >= 0)[:, None] & row_ok[None, :] & (
                    (rel < SINK)[:, None] | (L[None, :] - rel[:, None] < WINDOW))
                sT = tl.where(vis, sT, float("-inf"))
            pT = tl.exp2(sT - lse[None, :])
            dv = tl.dot(pT.to(do.dtype).to(DOT_T), do.to(DOT_T), dv, input_precision=DOT_PREC)
            dpT = tl.dot(v.to(DOT_T), tl.trans(do.to(DOT_T)), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - t * t)
            dk = tl.dot(dsT.to(q.dtype).to(DOT_T), q.to(DOT_T), dk, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _row_tile(P, b, h, rows, hi, stride_b, stride_h, stride_s, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Pointers [R, BLOCK_D] to the positions ``rows`` [R] (absolute) of batch ``b``, head ``h`` of a
        (B, heads, S, D) tensor with the given strides, and their mask (rows below ``hi``, columns < HEAD_DIM)."""
        offs_d = tl.arange(0, BLOCK_D)
        ok = (rows < hi)[:, None] & (offs_d < HEAD_DIM)[None, :]
        ptrs = (P + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
                + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :])
        return ptrs, ok

    @triton.jit
    def _load_kv(K, V, b, hk, cols, k_hi, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                 BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The K and V tiles [BLOCK_N, BLOCK_D] of the keys ``cols`` (zeros at and past ``k_hi``)."""
        k_ptrs, ok = _row_tile(K, b, hk, cols, k_hi, stride_kb, stride_kh, stride_ks, BLOCK_D, HEAD_DIM)
        v_ptrs, ok = _row_tile(V, b, hk, cols, k_hi, stride_vb, stride_vh, stride_vs, BLOCK_D, HEAD_DIM)
        return tl.load(k_ptrs, mask=ok, other=0.0), tl.load(v_ptrs, mask=ok, other=0.0)

    @triton.jit
    def _store_dkdv(DK, DV, dk, dv, b, hk, cols, k_hi, stride_dkb, stride_dkh, stride_dks, stride_dvb,
                    stride_dvh, stride_dvs, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Stores the fp32 tiles dk, dv [BLOCK_N, BLOCK_D] of the keys ``cols`` below ``k_hi`` (output dtype)."""
        dk_ptrs, ok = _row_tile(DK, b, hk, cols, k_hi, stride_dkb, stride_dkh, stride_dks, BLOCK_D, HEAD_DIM)
        dv_ptrs, ok = _row_tile(DV, b, hk, cols, k_hi, stride_dvb, stride_dvh, stride_dvs, BLOCK_D, HEAD_DIM)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=ok)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["H", "Hkv", "G", "Sq", "Skv", "NBLK", "N_SINK_BLK", "SINK", "WINDOW",
                                   "SQ_BUCKET"])
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEG, WORK,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                         stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                         H, Hkv, G, Sq, Skv, NBLK, N_SINK_BLK, SINK, WINDOW, qk_scale, sm_scale, cap_in,
                         cap_out, SQ_BUCKET, MODE: tl.constexpr, SOFTCAP: tl.constexpr,
                         DOT_PREC: tl.constexpr, DOT_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        if MODE == 2:  # grid (Hkv, work items)
            pid_head = tl.program_id(0)
            pid_blk = tl.program_id(1)
        else:
            # 1D grid: first the sink blocks of every (batch, kv head) -- they see every later query, the
            # longest programs -- then the other blocks head by head (consecutive key blocks share most
            # of their query rows: they meet in L2).
            pid = tl.program_id(0)
            n_heads = tl.num_programs(0) // NBLK
            n_first = n_heads * N_SINK_BLK
            in_sink = pid < n_first
            rest = tl.maximum(NBLK - N_SINK_BLK, 1)
            p = tl.maximum(pid - n_first, 0)
            pid_head = tl.where(in_sink, pid % n_heads, p // rest)
            pid_blk = tl.where(in_sink, pid // n_heads, N_SINK_BLK + p % rest)
        blk, b, hk, q_lo, q_hi, k_lo, k_hi = _program_segment(pid_blk, pid_head, SEG, WORK, Hkv, Sq, Skv, MODE)
        q_off = Skv - Sq
        n0 = k_lo + blk * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        b64 = b.to(tl.int64)
        k, v = _load_kv(K, V, b, hk, cols, k_hi, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        BLOCK_D, HEAD_DIM)

        # query rows that see this key block
        j_max = tl.minimum(n0 + BLOCK_N, k_hi) - 1
        is_sink = n0 < k_lo + SINK
        full_sink = n0 + BLOCK_N <= k_lo + SINK
        r_start = tl.maximum(n0, q_lo)
        w_end = j_max + WINDOW
        r_end = tl.where(is_sink | (w_end > k_hi), q_hi, tl.minimum(w_end, q_hi))
        r_end = tl.where(n0 < k_hi, tl.maximum(r_end, r_start), r_start)  # no real key in the block: no work
        n_low = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - r_start, 0), BLOCK_M)
        low_end = tl.minimum(r_start + n_low * BLOCK_M, r_end)
        full_hi = tl.where(full_sink, r_end, tl.minimum(r_end, n0 + WINDOW))
        full_hi = tl.where(n0 + BLOCK_N <= k_hi, full_hi, low_end)
        n_mid = tl.maximum(full_hi - low_end, 0) // BLOCK_M
        mid_end = low_end + n_mid * BLOCK_M

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(G):
            h64 = (hk * G + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            lse_base = LSE + (b64 * H + h64) * Sq
            delta_base = DELTA + (b64 * H + h64) * Sq
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                 q_off, r_start, low_end, cols, k_lo, k_hi, SINK, WINDOW, qk_scale, cap_in,
                                 cap_out, BLOCK_M, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                 q_off, low_end, mid_end, cols, k_lo, k_hi, SINK, WINDOW, qk_scale, cap_in,
                                 cap_out, BLOCK_M, BLOCK_D, HEAD_DIM, False, SOFTCAP, DOT_PREC, DOT_T)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                 q_off, mid_end, r_end, cols, k_lo, k_hi, SINK, WINDOW, qk_scale, cap_in,
                                 cap_out, BLOCK_M, BLOCK_D, HEAD_DIM, True, SOFTCAP, DOT_PREC, DOT_T)
        _store_dkdv(DK, DV, dk * sm_scale, dv, b, hk, cols, k_hi, stride_dkb, stride_dkh, stride_dks, stride_dvb,
                    stride_dvh, stride_dvs, BLOCK_D, HEAD_DIM)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
_TUNED: dict = {}  # (kernel kind, head_dim >= 256) -> triton Autotuner


def tuned_configs() -> dict:
    """The configs autotuning picked so far: {"fwd/dq/dkdv[ d256]": {key: config string}}."""
    return {f"{key[0]}{' d256' if key[1] else ''}{''.join(' ' + x for x in key[2:])}":
            {str(k): str(c) for k, c in tuner.cache.items()} for key, tuner in _TUNED.items()}


def _sq_bucket(n: int) -> int:
    """Autotuning key: configs are re-tuned per length bucket (<= 4K, <= 32K, longer)."""
    return 16 if n <= 4096 else (32 if n <= 32768 else 48)


def _outer_blocks(head_dim_p: int) -> dict:
    """Fixed outer block sizes (the work tables of packed sequences depend on them)."""
    if _interpret():
        b = INTERPRET_BLOCKS
        return {"fwd_m": b["fwd_m"], "dq_m": b["dq_m"], "dkdv_n": b["dkdv_n"]}
    if head_dim_p >= 256:
        return {"fwd_m": 64, "dq_m": 64, "dkdv_n": 64}
    return {"fwd_m": 128, "dq_m": 128, "dkdv_n": 128}


def _configs(kind: str, head_dim_p: int):
    """Small autotuning spaces (each config is one compile in a short GPU job). Chosen from sm_90a
    builds: 8 warps everywhere (4-warp variants spill at D=128), no config over 227 KB of smem."""
    C = triton.Config
    if head_dim_p >= 256:
        return {"fwd": [C({"BLOCK_N": 32}, num_warps=4, num_stages=2), C({"BLOCK_N": 64}, num_warps=8, num_stages=2)],
                "dq": [C({"BLOCK_N": 32}, num_warps=8, num_stages=2)],
                "dkdv": [C({"BLOCK_M": 32}, num_warps=8, num_stages=2)]}[kind]
    # The first config of each list is used when HF_LONGCTX_AUTOTUNE=0: the one furthest from the smem limit.
    return {"fwd": [C({"BLOCK_N": 128}, num_warps=8, num_stages=2), C({"BLOCK_N": 128}, num_warps=8, num_stages=3),
                    C({"BLOCK_N": 64}, num_warps=8, num_stages=3)],
            "dq": [C({"BLOCK_N": 32}, num_warps=8, num_stages=3), C({"BLOCK_N": 64}, num_warps=8, num_stages=3)],
            "dkdv": [C({"BLOCK_M": 32}, num_warps=8, num_stages=2), C({"BLOCK_M": 32}, num_warps=8, num_stages=3),
                     C({"BLOCK_M": 64}, num_warps=8, num_stages=2)]}[kind]


def _launcher(kind: str):
    """(kernel, tunable kwargs) for a kernel: autotuned on a GPU, fixed blocks under the interpreter."""
    base = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}[kind]
    if _interpret():
        b = INTERPRET_BLOCKS
        extra = {"fwd": {"BLOCK_N": b["fwd_n"]}, "dq": {"BLOCK_N": b["dq_n"]},
                 "dkdv": {"BLOCK_M": b["dkdv_m"]}}[kind]
        return base, extra
    return base, None


def _run(kind: str, grid, args: list, meta: dict, head_dim_p: int, variant: str = "default"):
    kernel, extra = _launcher(kind)
    if extra is not None:  # interpreter
        kernel[grid](*args, **meta, **extra)
        return
    key = (kind, head_dim_p >= 256) if variant == "default" else (kind, head_dim_p >= 256, variant)
    tuned = _TUNED.get(key)
    if tuned is None:
        configs = _configs(kind, head_dim_p)
        if kind == "fwd" and variant in _VARIANT_CONFIGS and head_dim_p < 256:
            configs = [triton.Config({"BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
                       for c in _VARIANT_CONFIGS[variant]]
        if os.environ.get("HF_LONGCTX_AUTOTUNE", "1") == "0":  # first config only: no tuning runs
            configs = configs[:1]
        tuned = triton.autotune(configs=configs, key=["SQ_BUCKET"])(kernel)
        _TUNED[key] = tuned
    tuned[grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# Host-side helpers: masks -> spans / segments / work tables
# --------------------------------------------------------------------------------------------
def kv_valid_to_spans(kv_valid: torch.Tensor, check: bool = True) -> torch.Tensor:
    """(B, Skv) bool padding mask -> (B, 2) int32 [start, end) of each row's real tokens.

    Left and right padding are supported: the real tokens of a row must be one contiguous span.
    With ``check`` (one host sync), a mask with holes raises ValueError. A row without real tokens
    gets the empty span (0, 0).
    """
    first, count, end = _envelope(kv_valid)
    spans = torch.stack([first, first + count], dim=1).contiguous()
    if check and not torch.compiler.is_compiling() and bool((spans[:, 1] != end).any()):
        raise ValueError("kv_valid: this mask has holes (a row's real tokens are not one contiguous span: left or "
                         f"right padding); only decoding takes holes: no gradient, not under torch.compile, at most "
                         f"{_SPLIT_MAX_SQ} query rows and G * Sq <= {_SPLIT_MAX_ROWS}")
    return spans


def _envelope(kv_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) int32 each: the first real slot, the number of real tokens, one past the last real slot (first + count
    and end differ exactly in the rows with holes). Rows without real tokens: 0, 0, 0."""
    if kv_valid.dim() != 2:
        raise ValueError(f"kv_valid must be (B, Skv), got shape {tuple(kv_valid.shape)}")
    real = kv_valid.to(torch.int8)
    count = real.sum(dim=1, dtype=torch.int32)
    first = torch.where(count > 0, real.argmax(dim=1).to(torch.int32), 0)
    end = torch.where(count > 0, real.shape[1] - real.flip(1).argmax(dim=1).to(torch.int32), 0)
    return first, count, end


def _row_cumsum(values: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Inclusive cumulative sum along dim 1 of a (B, S) int32 tensor, in chunks of ``chunk`` columns scanned side by
    side, then the chunks' offsets: a scan of a few long rows (decoding: B rows of a whole cache buffer) runs on few
    thread blocks and takes tens of microseconds; the chunked one fills the GPU."""
    rows, length = values.shape
    if length % chunk or length <= chunk:
        return values.cumsum(dim=1, dtype=torch.int32)
    parts = values.reshape(rows, length // chunk, chunk).cumsum(dim=2, dtype=torch.int32)
    totals = parts[:, :, -1]
    offsets = totals.cumsum(dim=1, dtype=torch.int32) - totals
    return (parts + offsets[:, :, None]).reshape(rows, length)


def hole_layout(kv_valid: torch.Tensor, sink_tokens: int, window: int | None, q_len: int,
                q_start: torch.Tensor | int | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The decode path's view of a (B, Skv) padding mask with holes (e.g. the rejected draft slots of speculative
    decoding). No host sync.

    Args:
        q_start: the slot of the first query row, the same in every row: an int or a (1,) int64 device tensor
            (a static block's counter); None: the last ``q_len`` slots hold the queries.
    Returns:
        spans: (B, 2) int32 [first real slot, last real slot + 1) (the kernel's mode-1 spans).
        (positions, bounds): (B, Skv) int32 logical index of each slot (real tokens before it; -1 for padding
            and holes), so sinks and windows count real tokens as the reference does; (B, 4) int32: one past the
            slot of the ``sink_tokens``-th real token (the span's start without sinks), the first slot of the
            first query row's window (the span's start without a window), the number of real tokens (the
            logical index of a query past the span, as in a static decoding step), and the first query row's slot.
    """
    first, _, end = _envelope(kv_valid)
    real = kv_valid.to(torch.int32)
    seen = _row_cumsum(real)  # real tokens up to and including each slot
    before = seen - real
    positions = torch.where(kv_valid.to(torch.bool), before, -1).to(torch.int32).contiguous()
    B, S = real.shape
    if q_start is None or isinstance(q_start, int):  # a fill, not a host-to-device copy (CUDA-graph capture)
        q_slot = torch.full((B, 1), S - q_len if q_start is None else q_start, dtype=torch.int64, device=real.device)
    else:
        q_slot = q_start.to(torch.int64).reshape(1, 1).expand(B, 1)
    if sink_tokens > 0:
        target = torch.full((B, 1), sink_tokens, dtype=torch.int32, device=real.device)
        sink_end = torch.minimum(torch.searchsorted(seen, target)[:, 0].to(torch.int32) + 1, end)
    else:
        sink_end = first
    if window is not None:
        lowest = before.gather(1, q_slot) - window + 1  # the first query row's oldest visible token
        win_lo = torch.maximum(torch.searchsorted(before, lowest)[:, 0].to(torch.int32), first)
    else:
        win_lo = first
    spans = torch.stack([first, end], dim=1).contiguous()
    bounds = torch.stack([sink_end, win_lo, seen[:, -1], q_slot[:, 0].to(torch.int32)], dim=1)
    return spans, (positions, bounds.to(torch.int32).contiguous())


def segment_table(segment_ids: torch.Tensor, kv_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) packed-sequence ids -> (n_seg, 5) int32 rows (b, q_lo, q_hi, k_lo, k_hi). One host sync.

    A segment is a maximal run of equal ids in a row; [q_lo, q_hi) is the run, [k_lo, k_hi) its real
    tokens (the whole run without ``kv_valid``; else they must be contiguous inside the run).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be (B, S), got shape {tuple(segment_ids.shape)}")
    B, S = segment_ids.shape
    dev = segment_ids.device
    change = torch.ones(B, S, dtype=torch.bool, device=dev)
    if S > 1:
        change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat = change.reshape(-1)
    starts = flat.nonzero().squeeze(1)  # host sync: the number of segments
    ends = torch.cat([starts[1:], torch.tensor([B * S], device=dev, dtype=starts.dtype)])
    b = starts // S
    q_lo = starts - b * S
    q_hi = ends - b * S
    if kv_valid is None:
        k_lo, k_hi = q_lo, q_hi
    else:
        if kv_valid.shape != segment_ids.shape:
            raise ValueError("kv_valid and segment_ids must have the same (B, S) shape")
        valid = kv_valid.reshape(-1).to(torch.bool)
        seg_of = torch.cumsum(flat.to(torch.int64), 0) - 1
        n_seg = starts.numel()
        pos = torch.arange(B * S, device=dev)
        count = torch.zeros(n_seg, dtype=torch.int64, device=dev).index_add_(0, seg_of, valid.to(torch.int64))
        big = torch.full((n_seg,), B * S, dtype=torch.int64, device=dev)
        first = big.scatter_reduce(0, seg_of, torch.where(valid, pos, B * S), reduce="amin", include_self=True)
        last = (big * 0 - 1).scatter_reduce(0, seg_of, torch.where(valid, pos, -1), reduce="amax",
                                            include_self=True)
        if not torch.compiler.is_compiling():
            holes = (count > 0) & (last - first + 1 != count)
            if bool(holes.any()):
                raise ValueError("kv_valid: inside each packed segment the real tokens must be contiguous")
        first = torch.where(count > 0, first, starts)
        k_lo = first - b * S
        k_hi = k_lo + count
    return torch.stack([b, q_lo, q_hi, k_lo, k_hi], dim=1).to(torch.int32).contiguous()


def _work_table(segs: torch.Tensor, lo_col: int, hi_col: int, block: int, length: int, batch: int) -> torch.Tensor:
    """(P, 2) int32 (segment or -1, block index) for blocks of ``block`` over each segment's
    [lo_col, hi_col) range. The segments of ``batch`` rows of ``length`` positions need at most
    P = batch * ceil(length / block) + n_seg blocks (each segment wastes less than one): known without a host
    sync."""
    n_seg = segs.shape[0]
    dev = segs.device
    lens = (segs[:, hi_col] - segs[:, lo_col]).clamp_min(0).to(torch.int64)
    nblk = (lens + block - 1) // block
    cum = torch.cumsum(nblk, 0)
    P = batch * triton.cdiv(length, block) + n_seg
    p = torch.arange(P, device=dev)
    s = torch.searchsorted(cum, p, right=True)
    live = s < n_seg
    sc = s.clamp_max(max(n_seg - 1, 0))
    blk = p - (cum - nblk)[sc]
    return torch.stack([torch.where(live, sc, -1), torch.where(live, blk, 0)], 1).to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# Launch wrappers (run inside the custom ops)
# --------------------------------------------------------------------------------------------
def _common(q, k, window, scale, softcap):
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    dense = window < 0
    win = _DENSE_WINDOW if dense else window
    qk_scale = scale * _LOG2E
    has_cap = softcap > 0.0
    cap_in = scale / softcap if has_cap else 1.0
    cap_out = softcap * _LOG2E if has_cap else 1.0
    if _interpret():
        # The interpreter (triton 3.9) multiplies bf16 tiles wrongly: its dots run in fp32, after the
        # same bf16/fp16 roundings of P and dS that the compiled kernels do.
        prec, dot_t = "ieee", tl.float32
    else:
        prec = "ieee" if q.dtype == torch.float32 else None  # None: triton's default for 16-bit dots
        dot_t = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]
    return B, H, Sq, D, Hkv, Skv, BLOCK_D, win, qk_scale, has_cap, cap_in, cap_out, (prec, dot_t)


# Forward schedules (internal; benchmarks/sink_variants.py times them side by side, NOTES-sink-kernel.md says
# what each changes). "default" stays the default until a GPU measurement picks another.
#   fused:   the five runs of _query_plan as one loop with a per-block mask switch (one software pipeline)
#   tma:     K/V blocks loaded through device-side TMA tensor descriptors (fused loop only)
#   grouped: grid order (query block, head-in-group): the G query heads of a KV head run side by side and
#            share each K/V block in L2 (modes 0/1)
# (No warp-specialised variant: tl.range(warp_specialize=True) gives the fused loop's PTX unchanged on sm_90.)
FWD_VARIANTS = {
    "default": dict(FUSED=False, TMA=False, GROUPED=False),
    "grouped": dict(FUSED=False, TMA=False, GROUPED=True),
    "fused": dict(FUSED=True, TMA=False, GROUPED=False),
    "fused-grouped": dict(FUSED=True, TMA=False, GROUPED=True),
    "fused-tma": dict(FUSED=True, TMA=True, GROUPED=False),
    "fused-tma-grouped": dict(FUSED=True, TMA=True, GROUPED=True),
    "fused-m256": dict(FUSED=True, TMA=False, GROUPED=False, M_SCALE=2),
    "fused-tma-m256": dict(FUSED=True, TMA=True, GROUPED=False, M_SCALE=2),
}
# m256: 256 query rows per program (16 warps): each K/V block brought from L2 serves twice the rows, halving
# the L2 -> SM traffic (128 rows x D=128 need ~6 TB/s of L2 bandwidth at 800 TFLOP/s: 128 FLOP per byte).
_VARIANT_CONFIGS = {"fused-m256": [dict(BLOCK_N=64, num_warps=16, num_stages=2)],
                    "fused-tma-m256": [dict(BLOCK_N=64, num_warps=16, num_stages=2)]}


_FWD_SCHEDULES = Schedules("forward variant", FWD_VARIANTS, "default")
# ``with forward_variant(name):`` runs the forward kernel with another schedule of FWD_VARIANTS (benchmarks, tests)
forward_variant = _FWD_SCHEDULES.use


def _tma_ready(*tensors) -> bool:
    """TMA descriptors need 16-byte aligned bases and strides; set Triton's scratch allocator once (the
    device-side descriptors live in a small global workspace)."""
    for t in tensors:
        if t.data_ptr() % 16 or any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return False
    if tensors[0].is_cuda:
        from triton.runtime import _allocation

        try:
            unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        except AttributeError:  # another triton layout: set ours
            unset = True
        if unset:
            triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    return True


def _dummy(t):
    return torch.empty(2, dtype=torch.int32, device=t.device)


def _use_split(mode: int, Sq: int, G: int) -> bool:
    return mode != 2 and Sq <= _SPLIT_MAX_SQ and G * Sq <= _SPLIT_MAX_ROWS


def takes_holes(q_len: int, groups: int) -> bool:
    """Whether a no-gradient call of ``q_len`` query rows with ``groups`` query heads per KV head runs the decode
    path, the one that takes a ``kv_valid`` with holes."""
    return _use_split(1, q_len, groups)


_N_SM: dict = {}  # device -> SM count (get_device_properties is slow on the decode path)


def _split_plan(device, B, Hkv, G, Sq, Skv, sink, window) -> tuple[int, int, int, int]:
    """(number of splits, BLOCK_N, BLOCK_R, num_warps) of the decode path. At most 4 programs per SM and
    at least ``_SPLIT_MIN_KEYS`` visited keys per split; one split (a single kernel, no combine) when the
    visited keys are that few or the (batch, KV head) programs alone fill the GPU."""
    block_n = INTERPRET_BLOCKS["split_n"] if _interpret() else 64
    min_keys = INTERPRET_BLOCKS["split_min_keys"] if _interpret() else _SPLIT_MIN_KEYS
    n_sm = _N_SM.get(device)
    if n_sm is None:
        n_sm = 132 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
        _N_SM[device] = n_sm
    upper = Skv if window < 0 else min(Skv, sink + window + Sq)
    nsplit = max(1, min(triton.cdiv(max(upper, 1), min_keys), triton.cdiv(4 * n_sm, B * Hkv), 128))
    block_r = max(16, triton.next_power_of_2(G * Sq))
    return nsplit, block_n, block_r, 4 if block_r <= 64 else 8


def _forward(q, k, v, s_aux, seg, mode, sink, window, scale, softcap, holes=None):
    """The forward launch; ``holes``: None, or (key positions, slot bounds) from :func:`hole_layout` for a mode-1
    mask with holes (decode path only: the caller checks :func:`takes_holes`)."""
    B, H, Sq, D, Hkv, Skv, BLOCK_D, win, qk_scale, has_cap, cap_in, cap_out, prec = _common(
        q, k, window, scale, softcap)
    sink = 0 if window < 0 else sink
    G = H // Hkv
    out = torch.empty(B, Sq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    if Sq == 0:
        return out, lse
    seg_t = seg if seg is not None else _dummy(q)
    sa_t = s_aux if s_aux is not None else _dummy(q)

    if _use_split(mode, Sq, G):
        nsplit, block_n, block_r, warps = _split_plan(q.device, B, Hkv, G, Sq, Skv, sink, window)
        direct = nsplit == 1
        o_part = l_part = lse  # unused by the one-split kernel
        if not direct:
            o_part = torch.empty(B, H, nsplit, Sq, D, device=q.device, dtype=torch.float32)
            l_part = torch.empty(B, H, nsplit, Sq, device=q.device, dtype=torch.float32)
        kpos, bounds = holes if holes is not None else (seg_t, seg_t)
        _fwd_split_kernel[(nsplit, B * Hkv)](
            q, k, v, o_part, l_part, seg_t, kpos, bounds, out, lse, sa_t,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Hkv, G, Sq, Skv, nsplit, sink, win, qk_scale, cap_in, cap_out,
            DIRECT=direct, HAS_SAUX=s_aux is not None, HOLES=holes is not None,
            MODE=mode, SOFTCAP=has_cap, DOT_PREC=prec[0], DOT_T=prec[1], HEAD_DIM=D, BLOCK_D=BLOCK_D,
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, num_stages=2)
        if direct:
            return out, lse
        _split_combine_kernel[(B * H * Sq,)](
            o_part, l_part, out, lse, sa_t, out.stride(0), out.stride(1), out.stride(2),
            H, Sq, nsplit, HAS_SAUX=s_aux is not None, HEAD_DIM=D, BLOCK_D=BLOCK_D,
            BLOCK_S=max(2, triton.next_power_of_2(nsplit)), num_warps=4)
        return out, lse

    blocks = _outer_blocks(BLOCK_D)
    bm = blocks["fwd_m"]
    variant = _FWD_SCHEDULES.name
    flags = dict(FWD_VARIANTS[variant])
    bm *= flags.pop("M_SCALE", 1)
    flags["GROUPED"] = flags["GROUPED"] and mode != 2
    flags["TMA"] = flags["TMA"] and _tma_ready(k, v)
    if mode == 2:
        work = _work_table(seg, 1, 2, bm, Sq, B)
        grid = (work.shape[0], H)
    else:
        work = _dummy(q)
        grid = (triton.cdiv(Sq, bm) * G, B * Hkv) if flags["GROUPED"] else (triton.cdiv(Sq, bm), B * H)
    args = [q, k, v, out, lse, sa_t, seg_t, work,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, G, Sq, Skv, sink, win, qk_scale, cap_in, cap_out, _sq_bucket(Sq)]
    meta = dict(MODE=mode, HAS_SAUX=s_aux is not None, SOFTCAP=has_cap, DOT_PREC=prec[0], DOT_T=prec[1], HEAD_DIM=D,
                BLOCK_D=BLOCK_D, BLOCK_M=bm, **flags)
    _run("fwd", grid, args, meta, BLOCK_D, variant)
    return out, lse


def _backward(do, q, k, v, o, lse, s_aux, seg, mode, sink, window, scale, softcap, grad_lse=None):
    B, H, Sq, D, Hkv, Skv, BLOCK_D, win, qk_scale, has_cap, cap_in, cap_out, prec = _common(
        q, k, window, scale, softcap)
    sink = 0 if window < 0 else sink
    G = H // Hkv
    dq = torch.empty_like(q)
    zero_kv = mode != 0
    dk = torch.zeros_like(k) if zero_kv else torch.empty_like(k)
    dv = torch.zeros_like(v) if zero_kv else torch.empty_like(v)
    ds_aux = torch.zeros(0, device=q.device, dtype=torch.float32)
    if Sq == 0 or Skv == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if s_aux is not None:
            ds_aux = torch.zeros_like(s_aux)
        return dq, dk, dv, ds_aux
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    bm_delta = 16 if _interpret() else 64
    _bwd_delta_kernel[(triton.cdiv(Sq, bm_delta), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Sq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm_delta, num_warps=4)
    # A gradient g_i of the LSE output (log2 units) adds g_i * log2(e) * p_ij to dS_ij (natural units): the same
    # kernels, run with delta_i - g_i * log2(e).
    lse_term = None if grad_lse is None else grad_lse.float() * _LOG2E
    if lse_term is not None:
        delta = delta - lse_term
    seg_t = seg if seg is not None else _dummy(q)
    blocks = _outer_blocks(BLOCK_D)
    common = [H, G, Sq, Skv, sink, win, qk_scale, scale, cap_in, cap_out, _sq_bucket(Sq)]
    meta = dict(MODE=mode, SOFTCAP=has_cap, DOT_PREC=prec[0], DOT_T=prec[1], HEAD_DIM=D, BLOCK_D=BLOCK_D)

    bm = blocks["dq_m"]
    if mode == 2:
        work = _work_table(seg, 1, 2, bm, Sq, B)
        grid = (work.shape[0], H)
    else:
        work = _dummy(q)
        grid = (triton.cdiv(Sq, bm), B * H)
    pdp = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32) if s_aux is not None else delta
    args = [q, k, v, do, lse, delta, dq, pdp, seg_t, work,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2)] + common
    _run("dq", grid, args, dict(meta, BLOCK_M=bm, ROW_PDP=s_aux is not None), BLOCK_D)

    bn = blocks["dkdv_n"]
    nblk = triton.cdiv(Skv, bn)
    if mode == 2:
        work = _work_table(seg, 3, 4, bn, Skv, B)
        grid = (Hkv, work.shape[0])
    else:
        work = _dummy(q)
        grid = (B * Hkv * nblk,)
    n_sink_blk = min(triton.cdiv(sink, bn), nblk)
    args = [q, k, v, do, lse, delta, dk, dv, seg_t, work,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, Hkv, G, Sq, Skv, nblk, n_sink_blk] + common[4:]
    _run("dkdv", grid, args, dict(meta, BLOCK_N=bn), BLOCK_D)

    if s_aux is not None:
        # d s_aux[h] = -sum_{b,i} P(sink)_i * sum_j p_ij dp_ij, with P(sink) = exp(s_aux - lse); the row sums
        # come from the dq kernel in fp32 (rowsum(o * do) would carry the rounding of o)
        sa2 = s_aux.float() * _LOG2E
        p_sink = torch.exp2(sa2[None, :, None] - lse)
        if lse_term is not None:
            pdp = pdp - lse_term
        ds_aux = -(p_sink * pdp).sum(dim=(0, 2)).to(s_aux.dtype)
    return dq, dk, dv, ds_aux


# --------------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_longctx::sink_window_fwd", mutates_args=())
def sink_window_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s_aux: torch.Tensor | None,
                    segments: torch.Tensor | None, mode: int, sink_tokens: int, window: int, scale: float,
                    softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, H, Sq, D) laid out as (B, Sq, H, D), lse (B, H, Sq) fp32 in log2 units).

    ``window < 0`` means dense causal; ``softcap <= 0`` means none; ``mode`` 0/1/2 with ``segments``
    None / (B, 2) spans / (n_seg, 5) packed segments (see the module docstring).
    """
    return _forward(q, k, v, s_aux, segments, mode, sink_tokens, window, scale, softcap)


@sink_window_fwd.register_fake
def _(q, k, v, s_aux, segments, mode, sink_tokens, window, scale, softcap):
    B, H, Sq, D = q.shape
    out = q.new_empty(B, Sq, H, D).transpose(1, 2)
    return out, q.new_empty(B, H, Sq, dtype=torch.float32)


@torch.library.custom_op("hf_longctx::sink_window_bwd", mutates_args=())
def sink_window_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, s_aux: torch.Tensor | None, segments: torch.Tensor | None, mode: int,
                    sink_tokens: int, window: int, scale: float, softcap: float, grad_lse: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv, d_s_aux); d_s_aux is an empty tensor when ``s_aux`` is None. ``grad_lse``: the
    gradient of the forward's LSE output (B, H, Sq), None when the LSE was not used."""
    return _backward(do, q, k, v, o, lse, s_aux, segments, mode, sink_tokens, window, scale, softcap, grad_lse)


@sink_window_bwd.register_fake
def _(do, q, k, v, o, lse, s_aux, segments, mode, sink_tokens, window, scale, softcap, grad_lse=None):
    ds = torch.empty_like(s_aux) if s_aux is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def _setup_context(ctx, inputs, output):
    q, k, v, s_aux, segments, mode, sink_tokens, window, scale, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, s_aux, segments)
    ctx.params = (mode, sink_tokens, window, scale, softcap)
    ctx.has_saux = s_aux is not None


def _backward_fn(ctx, grad_out, grad_lse):
    q, k, v, out, lse, s_aux, segments = ctx.saved_tensors
    mode, sink_tokens, window, scale, softcap = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, ds = sink_window_bwd(grad_out, q, k, v, out, lse, s_aux, segments, mode, sink_tokens, window,
                                     scale, softcap, grad_lse)
    return dq, dk, dv, (ds if ctx.has_saux else None), None, None, None, None, None, None


torch.library.register_autograd("hf_longctx::sink_window_fwd", _backward_fn, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------
def unsupported_reason(query, key, value, *, sink_tokens=0, window=None, scale=None, softcap=None, s_aux=None,
                       kv_valid=None, segment_ids=None) -> str | None:
    """Why the Triton path cannot run these inputs (a message naming the parameter), or None."""
    if triton is None:
        return "triton is not installed"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4D tensor (B, heads, seq, head_dim)"
    if not (query.is_cuda or (_interpret() and query.device.type == "cpu")):
        return f"query is on {query.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    if query.is_cuda and not torch.compiler.is_compiling() and _capability(query.device) < 8:
        return "the Triton kernel needs a GPU of compute capability 8.0 or newer"
    if key.device != query.device or value.device != query.device:
        return "query, key and value must be on one device"
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype: query/key/value must share one of {_DTYPES}, got {query.dtype}/{key.dtype}/{value.dtype}"
    if query.is_cuda and query.dtype == torch.float32:
        return "dtype: float32 is not supported on CUDA (bfloat16 or float16; float32 runs only in the interpreter)"
    B, H, Sq, D = query.shape
    if key.shape != value.shape or key.shape[0] != B or key.shape[3] != D:
        return f"key/value shape {tuple(key.shape)}/{tuple(value.shape)} do not match query {tuple(query.shape)}"
    Hkv, Skv = key.shape[1], key.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        return f"num heads: query heads ({H}) must be a multiple of key/value heads ({Hkv})"
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head_dim={D} is not supported by the Triton kernel; supported: {SUPPORTED_HEAD_DIMS}"
    if Sq > Skv:
        return f"query length ({Sq}) exceeds key length ({Skv}); queries are the last Sq keys"
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        return f"sink_tokens must be an int >= 0, got {sink_tokens!r}"
    if window is not None and (not isinstance(window, int) or window < 1):
        return f"window must be None or an int >= 1, got {window!r}"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return f"scale must be a finite number > 0, got {scale!r}"
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        return f"softcap must be None or a number > 0, got {softcap!r}"
    if s_aux is not None:
        if not isinstance(s_aux, torch.Tensor) or tuple(s_aux.shape) != (H,):
            return f"s_aux must be a tensor of shape ({H},) (one logit per query head)"
        if s_aux.device != query.device:
            return "s_aux must be on the query's device"
    if kv_valid is not None:
        if not isinstance(kv_valid, torch.Tensor) or tuple(kv_valid.shape) != (B, Skv):
            return f"kv_valid must be a (B, Skv) = ({B}, {Skv}) bool tensor"
        if kv_valid.device != query.device:
            return "kv_valid must be on the query's device"
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or tuple(segment_ids.shape) != (B, Skv):
            return f"segment_ids must be a (B, Skv) = ({B}, {Skv}) integer tensor"
        if Sq != Skv:
            return f"segment_ids (packed sequences) need Sq == Skv, got Sq={Sq}, Skv={Skv}"
        if segment_ids.device != query.device:
            return "segment_ids must be on the query's device"
    return None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sink_window_attention_segments(query, key, value, *, sink_tokens: int, window: int | None,
                                   scale: float | None = None, softcap: float | None = None,
                                   s_aux: torch.Tensor | None = None, kv_spans: torch.Tensor | None = None,
                                   segments: torch.Tensor | None = None, return_lse: bool = False,
                                   holes: tuple[torch.Tensor, torch.Tensor] | None = None
                                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lower-level entry: masks already converted (no host sync, no mask checks).

    ``kv_spans``: (B, 2) int32 [start, end) of each row's real keys (from :func:`kv_valid_to_spans`), or with
    ``holes`` (decoding only: :func:`takes_holes`) the envelope spans and the layout :func:`hole_layout` gives.
    ``segments``: (n_seg, 5) int32 from :func:`segment_table` (packed sequences; Sq == Skv).
    Returns (B, H, Sq, D) in query.dtype (memory laid out as (B, Sq, H, D)); with ``return_lse`` also the
    (B, H, Sq) float32 natural-log LSE of each row (``s_aux`` included; -inf for a row that sees no key),
    differentiable like the output.
    """
    reason = unsupported_reason(query, key, value, sink_tokens=sink_tokens, window=window, scale=scale,
                                softcap=softcap, s_aux=s_aux)
    if reason is not None:
        raise ValueError(f"sink_window_attention_triton: {reason}")
    if holes is not None and (kv_spans is None or not takes_holes(query.shape[2], query.shape[1] // key.shape[1])):
        raise ValueError("sink_window_attention_segments: `holes` needs `kv_spans` (hole_layout's) and a decoding "
                         "call (few query rows)")
    return _checked_call(query, key, value, sink_tokens, window, scale, softcap, s_aux, kv_spans, segments,
                         return_lse, holes)


def _checked_call(query, key, value, sink_tokens, window, scale, softcap, s_aux, kv_spans, segments, return_lse,
                  holes=None):
    """:func:`sink_window_attention_segments` after its input check. Without autograd (no input needs a
    gradient, or grad mode off) and outside torch.compile, the launcher runs without the custom op's
    dispatch: the decode path's per-call cost is Python, not GPU work. ``holes``: see :func:`hole_layout`
    (``kv_spans`` then holds its envelope spans)."""
    if kv_spans is not None and segments is not None:
        raise ValueError("give kv_spans or segments, not both (segment_table folds kv_valid in)")
    B, H, Sq, D = query.shape
    Skv = key.shape[2]
    scale = float(D ** -0.5 if scale is None else scale)
    if window is not None and window >= Skv:
        window = None  # the window covers everything: dense causal
    if Skv == 0 or query.numel() == 0:
        out = query.new_zeros(B, Sq, H, D).transpose(1, 2)
        return (out, query.new_full((B, H, Sq), float("-inf"), dtype=torch.float32)) if return_lse else out
    mode, seg = 0, None
    if segments is not None:
        if segments.dim() != 2 or segments.shape[1] != 5:
            raise ValueError("segments must be an (n_seg, 5) int32 table from segment_table()")
        if Sq != Skv:
            raise ValueError(f"segments (packed sequences) need Sq == Skv, got Sq={Sq}, Skv={Skv}")
        mode, seg = 2, segments.to(device=query.device, dtype=torch.int32).contiguous()
    elif kv_spans is not None:
        if tuple(kv_spans.shape) != (B, 2):
            raise ValueError(f"kv_spans must be (B, 2) = ({B}, 2)")
        mode, seg = 1, kv_spans.to(device=query.device, dtype=torch.int32).contiguous()
    args = (_last_dim_contiguous(query), _last_dim_contiguous(key), _last_dim_contiguous(value), s_aux, seg, mode,
            int(sink_tokens), -1 if window is None else int(window), scale, 0.0 if softcap is None else float(softcap))
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad or (
        s_aux is not None and s_aux.requires_grad))
    if needs_grad or torch.compiler.is_compiling():
        out, lse = sink_window_fwd(*args)
    else:
        out, lse = _forward(*args, holes=holes)
    if not return_lse:
        return out
    # The kernels keep log2 units and +inf for empty rows (so that their backward's exp2(s - lse) is 0).
    return out, torch.where(lse == float("inf"), float("-inf"), lse * (1 / _LOG2E))


def sink_window_attention_triton(query, key, value, *, sink_tokens: int, window: int | None,
                                 scale: float | None = None, softcap: float | None = None,
                                 s_aux: torch.Tensor | None = None, kv_valid: torch.Tensor | None = None,
                                 segment_ids: torch.Tensor | None = None, query_chunk: int | None = None,
                                 key_chunk: int | None = None, return_lse: bool = False,
                                 q_start: torch.Tensor | int | None = None
                                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sink + sliding-window causal attention (Triton), same contract as the PyTorch reference.

    query (B, H, Sq, D); key, value (B, H_kv, Skv, D); queries are the last Sq of the Skv positions.
    ``window=None`` (or >= Skv) is dense causal attention. ``kv_valid`` (B, Skv) bool: real tokens, one
    contiguous span per row, or, for decoding (no gradient, few query rows: else ValueError), any mask: sinks and
    windows then count real tokens, holes excluded, as the reference does. ``segment_ids`` (B, Skv): packed sequences
    (Sq == Skv), no attention across segments. ``s_aux`` (H,): learned sink logits (an extra softmax
    term with no value). ``softcap``: s = softcap * tanh(s / softcap). Returns (B, H, Sq, D) in
    query.dtype; differentiable in query, key, value and s_aux. Unsupported input -> ValueError.
    ``query_chunk`` / ``key_chunk`` are the reference's tile sizes, accepted and ignored here.
    ``return_lse``: also return the (B, H, Sq) float32 natural-log LSE, as the reference does.
    ``q_start``: decoding with ``kv_valid`` only: the query rows are the slots from ``q_start`` on (an int or a (1,)
    int64 device tensor, no host sync) instead of the last Sq; keys past them must be masked out in ``kv_valid``.
    """
    reason = unsupported_reason(query, key, value, sink_tokens=sink_tokens, window=window, scale=scale,
                                softcap=softcap, s_aux=s_aux, kv_valid=kv_valid, segment_ids=segment_ids)
    if reason is not None:
        raise ValueError(f"sink_window_attention_triton: {reason}")
    if q_start is not None and (kv_valid is None or segment_ids is not None):
        raise ValueError("sink_window_attention_triton: `q_start` needs `kv_valid` (the keys past the queries "
                         "masked out) and no `segment_ids`")
    kv_spans = segments = holes = None
    if segment_ids is not None:
        segments = segment_table(segment_ids, kv_valid)
    elif kv_valid is not None:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, s_aux))
        decoding = takes_holes(query.shape[2], query.shape[1] // key.shape[1])
        if decoding and not grad and not torch.compiler.is_compiling():
            # any mask (holes too), converted on the device: no host sync, so a CUDA graph can capture the call
            kv_spans, holes = hole_layout(kv_valid, sink_tokens, window, query.shape[2], q_start)
        elif q_start is not None:
            raise ValueError("sink_window_attention_triton: `q_start` is for decoding only (no gradient, at most "
                             f"{_SPLIT_MAX_SQ} query rows and {_SPLIT_MAX_ROWS} rows per key/value head)")
        else:
            kv_spans = kv_valid_to_spans(kv_valid)  # one host sync: holes raise
    return _checked_call(query, key, value, sink_tokens, window, scale, softcap, s_aux, kv_spans, segments,
                         return_lse, holes)
