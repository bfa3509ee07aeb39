"""Triton sink/window attention kernel (hf_longctx.kernels.sink_window) against two oracles.

Oracles: the pure-PyTorch reference (``kernels.reference.sink_window_attention``) and
``torch.nn.functional.scaled_dot_product_attention`` with an explicit boolean mask.

- Unmarked tests run the kernels through the Triton interpreter on CPU (small shapes); they need
  ``TRITON_INTERPRET=1`` in the environment before triton is imported (``make test`` runs this module
  in its own pytest process; tests/conftest.py skips them otherwise).
- ``@pytest.mark.cuda`` tests run compiled kernels at full size on a GPU (benchmarks/run_gpu_sink.sh).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_longctx.kernels import reference
from hf_longctx.kernels import sink_window as sw

pytestmark = pytest.mark.skipif(sw.triton is None, reason="triton is not installed")

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def visibility_mask(batch, q_len, kv_len, sink_tokens, window, kv_valid=None, segment_ids=None, device=CPU):
    """(B, Sq, Skv) bool: key j visible from query i, built directly from the definition."""
    pos = reference.logical_positions(batch, kv_len, device, kv_valid, segment_ids)
    valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device) if kv_valid is None else kv_valid.bool()
    q_abs = torch.arange(kv_len - q_len, kv_len, device=device)
    keys = torch.arange(kv_len, device=device)
    mask = valid[:, None, :] & (keys[None, None, :] <= q_abs[None, :, None])
    if segment_ids is not None:
        mask &= segment_ids[:, q_abs, None] == segment_ids[:, None, :]
    if window is not None:
        q_pos = pos[:, q_abs]
        mask &= (pos[:, None, :] < sink_tokens) | (q_pos[:, :, None] - pos[:, None, :] < window)
    return mask


def sdpa_oracle(q, k, v, mask, scale=None):
    """SDPA with an explicit boolean mask (GQA by repetition). Rows without any key give zeros."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    live = mask.any(dim=-1)  # (B, Sq)
    safe = mask | ~live[..., None]  # SDPA gives NaN for rows with no key: give them one, zero them after
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None], scale=scale)
    return out * live[:, None, :, None].to(out.dtype)


def eager_attention(q, k, v, mask, scale=None, softcap=None, s_aux=None):
    """transformers' eager attention in the inputs' dtype: scores and P @ V in that dtype, softmax in
    fp32 then cast back (the same-dtype PyTorch computation for the error bar)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(scores.dtype)
        scores = torch.cat([scores, sinks], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    if s_aux is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, v)


def make_inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype=torch.float32, device=CPU, seed=0,
                noncontiguous=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if noncontiguous:  # (B, S, H, D) memory, viewed as (B, H, S, D), as models produce it
        q = torch.randn(batch, q_len, heads, dim, generator=gen).transpose(1, 2)
        k = torch.randn(batch, kv_len, kv_heads, dim, generator=gen).transpose(1, 2)
        v = torch.randn(batch, kv_len, kv_heads, dim, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, q_len, dim, generator=gen)
        k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
        v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# ------------------------------------------------------------------------------------------------
# interpreter tests (CPU)
# ------------------------------------------------------------------------------------------------
# (batch, heads, kv_heads, q_len, kv_len, dim, sink_tokens, window, extra)
CASES = {
    "odd-37": (1, 2, 1, 37, 37, 32, 4, 10, {}),
    "len-1": (1, 2, 1, 1, 1, 32, 4, 8, {}),
    "len-7": (2, 2, 2, 7, 7, 32, 2, 3, {}),
    "gqa-100": (1, 4, 2, 100, 100, 64, 4, 20, {}),
    "len-130-no-sink": (1, 2, 1, 130, 130, 32, 0, 33, {}),
    "q-offset": (1, 2, 2, 20, 50, 32, 3, 8, {}),
    "decode": (2, 4, 1, 1, 130, 32, 4, 40, {}),
    "decode-chunk": (1, 4, 2, 5, 64, 32, 3, 20, {}),
    "dense-none": (1, 2, 1, 70, 70, 32, 4, None, {}),
    "dense-big-window": (1, 2, 1, 45, 45, 32, 4, 200, {}),
    "scale": (1, 2, 1, 40, 40, 32, 4, 12, {"scale": 0.3}),
    "softcap": (1, 2, 1, 50, 50, 32, 2, 16, {"softcap": 2.0}),
    "noncontiguous": (1, 4, 2, 40, 40, 32, 3, 11, {"noncontiguous": True}),
    "head-dim-48": (1, 2, 1, 33, 33, 48, 2, 9, {}),
    "many-sinks": (2, 2, 1, 77, 77, 32, 35, 10, {}),
}


def _run_case(batch, heads, kv_heads, q_len, kv_len, dim, sink, window, extra, dtype=torch.float32,
              s_aux=False, kv_valid=None, segment_ids=None):
    extra = dict(extra)
    noncontiguous = extra.pop("noncontiguous", False)
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype, noncontiguous=noncontiguous)
    inputs = [q, k, v]
    aux = None
    if s_aux:
        aux = (torch.randn(heads, generator=torch.Generator().manual_seed(1)) * 2).to(dtype).requires_grad_()
        inputs.append(aux)
    kw = dict(sink_tokens=sink, window=window, s_aux=aux, kv_valid=kv_valid, segment_ids=segment_ids, **extra)
    out = sw.sink_window_attention_triton(q, k, v, **kw)
    assert out.shape == (batch, heads, q_len, dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = grads(out, inputs, grad_out)

    # oracle: the reference in fp32 on fp32 copies of the inputs
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref_kw = dict(kw, s_aux=ref_inputs[3] if s_aux else None)
    ref = reference.sink_window_attention(*ref_inputs[:3], **ref_kw)
    want = grads(ref, ref_inputs, grad_out.float())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for name, a, b in zip(["dq", "dk", "dv", "ds_aux"], got, want):
        assert a is not None and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), b, atol=tol * 5, rtol=tol * 5, msg=lambda m, n=name: f"{n}: {m}")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    _run_case(*CASES[name])


# Forward schedules (sw.FWD_VARIANTS): each must give the reference's output and LSE. The backward does not
# depend on the variant (it reads the forward's LSE, checked here).
VARIANT_CASES = {
    "odd-37": CASES["odd-37"], "gqa-100": CASES["gqa-100"], "len-130-no-sink": CASES["len-130-no-sink"],
    "q-offset": CASES["q-offset"], "dense-none": CASES["dense-none"], "softcap": CASES["softcap"],
    "many-sinks": CASES["many-sinks"], "noncontiguous": CASES["noncontiguous"],
}


def _variant_forward(variant, batch, heads, kv_heads, q_len, kv_len, dim, sink, window, extra, **kw):
    extra = dict(extra)
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, kv_len, dim, noncontiguous=extra.pop("noncontiguous", False))
    kw = dict(sink_tokens=sink, window=window, return_lse=True, **extra, **kw)
    with torch.no_grad():
        with sw.forward_variant(variant):
            out, lse = sw.sink_window_attention_triton(q, k, v, **kw)
        want, want_lse = reference.sink_window_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", sorted(set(sw.FWD_VARIANTS) - {"default"}))
@pytest.mark.parametrize("name", list(VARIANT_CASES))
def test_forward_variants(variant, name):
    _variant_forward(variant, *VARIANT_CASES[name])


@pytest.mark.parametrize("variant", ["fused", "grouped", "fused-tma-grouped"])
def test_forward_variants_masks(variant):
    s_aux = torch.randn(4, generator=torch.Generator().manual_seed(1)) * 2
    _variant_forward(variant, 3, 4, 2, 45, 45, 32, 3, 9, {}, kv_valid=_padding_mask(), s_aux=s_aux)
    seg = torch.tensor([[0] * 10 + [1] * 25 + [2] * 2 + [3] * 8, [5] * 45])
    _variant_forward(variant, 2, 4, 2, 45, 45, 32, 3, 9, {}, segment_ids=seg)


@pytest.mark.parametrize("s_aux", [False, True])
def test_decode_single_kernel(monkeypatch, s_aux):
    """Few visible keys: one split, the split kernel writes the final rows (no combine kernel)."""
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "split_min_keys", 4096)
    assert sw._split_plan(CPU, 2, 1, 4, 1, 130, 4, 40)[0] == 1
    _run_case(2, 4, 1, 1, 130, 32, 4, 40, {}, s_aux=s_aux)
    _run_case(1, 4, 2, 5, 64, 32, 3, 20, {"softcap": 2.0}, s_aux=s_aux)


def test_no_grad_path_matches_custom_op():
    """Without autograd the launcher runs outside the custom op: same output and LSE."""
    q, k, v = make_inputs(1, 4, 2, 40, 40, 32)
    with_grad = sw.sink_window_attention_triton(q, k, v, sink_tokens=3, window=11, return_lse=True)
    assert with_grad[0].requires_grad
    with torch.no_grad():
        no_grad = sw.sink_window_attention_triton(q, k, v, sink_tokens=3, window=11, return_lse=True)
    assert not no_grad[0].requires_grad
    for a, b in zip(with_grad, no_grad):
        torch.testing.assert_close(a.detach(), b, atol=0, rtol=0)


def test_forward_variant_errors():
    with pytest.raises(ValueError, match="forward variant"):
        with sw.forward_variant("nope"):
            pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    _run_case(1, 4, 2, 50, 50, 64, 4, 16, {}, dtype=dtype)


def test_s_aux():
    _run_case(1, 4, 2, 45, 45, 32, 3, 12, {}, s_aux=True)


def test_s_aux_decode_and_softcap():
    _run_case(1, 4, 2, 1, 60, 32, 3, 12, {"softcap": 3.0}, s_aux=True)


def _padding_mask():
    valid = torch.ones(3, 45, dtype=torch.bool)
    valid[0, :7] = False  # left padding
    valid[1, 38:] = False  # right padding
    valid[2, :] = False  # no real token at all
    return valid


@pytest.mark.parametrize("q_len", [45, 9, 1])
def test_padding_spans(q_len):
    _run_case(3, 2, 1, q_len, 45, 32, 3, 9, {}, kv_valid=_padding_mask())


def _holes_mask():
    """Padding with holes (speculative decoding's rejected draft slots): left padding then holes, holes inside
    the sinks, a row without holes, a row whose window spans many holes, and a row without real tokens."""
    valid = torch.ones(5, 90, dtype=torch.bool)
    valid[0, :6] = False
    valid[0, 40:43] = False
    valid[0, 80:82] = False
    valid[1, 1:3] = False
    valid[3, 20:70:2] = False
    valid[4] = False
    return valid


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("sink, window", [(0, None), (3, 9), (4, 30)])
def test_decode_with_holes(monkeypatch, q_len, sink, window):
    """The decode path with holes in kv_valid (no gradient) against the reference; several splits per row."""
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "split_min_keys", 16)
    valid = _holes_mask()
    q, k, v = (t.detach() for t in make_inputs(5, 4, 2, q_len, 90, 32, seed=q_len))
    kw = dict(sink_tokens=sink, window=window, kv_valid=valid, softcap=2.0 if sink == 3 else None)
    with torch.no_grad():
        out, lse = sw.sink_window_attention_triton(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.sink_window_attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sink, window", [(0, None), (3, 9)])
def test_static_step_with_holes(monkeypatch, sink, window):
    """A graph-captured decoding step's call (a mask with holes, converted without a host sync): the key buffer is
    longer than the stored slots and the query sits past them; holes and unused slots are both non-real."""
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "split_min_keys", 16)
    valid = _holes_mask()
    valid[:, 80:] = False  # the buffer's unused slots: the query (row 89) sits past the stored 80
    q, k, v = (t.detach() for t in make_inputs(5, 4, 2, 1, 90, 32, seed=3))
    with torch.no_grad():
        out = sw.sink_window_attention_triton(q, k, v, sink_tokens=sink, window=window, kv_valid=valid)
    ref = reference.sink_window_attention(q, k, v, sink_tokens=sink, window=window, kv_valid=valid)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sink, window", [(0, None), (3, 9), (4, 30)])
@pytest.mark.parametrize("device_start", [False, True])
def test_static_block_with_q_start(monkeypatch, sink, window, device_start):
    """A static block of speculative decoding: 5 query rows at slots 75..79 of a 90-slot buffer (q_start, an int or
    a device tensor), keys past them masked out; against the reference on the buffer cut after the queries, where
    they are the last rows, and against the reference given the same q_start."""
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "split_min_keys", 16)
    valid = _holes_mask()
    valid[:, 80:] = False
    q, k, v = (t.detach() for t in make_inputs(5, 4, 2, 5, 90, 32, seed=11))
    start = torch.tensor([75]) if device_start else 75
    kw = dict(sink_tokens=sink, window=window, softcap=2.0 if sink == 3 else None)
    with torch.no_grad():
        out, lse = sw.sink_window_attention_triton(q, k, v, kv_valid=valid, q_start=start, return_lse=True, **kw)
    cut, cut_lse = reference.sink_window_attention(q, k[:, :, :80], v[:, :, :80], kv_valid=valid[:, :80],
                                                   return_lse=True, **kw)
    ref = reference.sink_window_attention(q, k, v, kv_valid=valid, q_start=start, **kw)
    torch.testing.assert_close(out, cut, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, cut_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ref, cut, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("length", [90, 128, 1024, 1000])
def test_row_cumsum_in_chunks_equals_cumsum(length):
    values = (torch.rand(3, length, generator=torch.Generator().manual_seed(length)) < 0.7).to(torch.int32)
    assert torch.equal(sw._row_cumsum(values), values.cumsum(dim=1, dtype=torch.int32))


def test_q_start_outside_decoding_raises():
    q, k, v = make_inputs(1, 4, 2, 5, 90, 32)
    with pytest.raises(ValueError, match="`q_start` is for decoding only"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=0, window=None, kv_valid=_holes_mask()[:1], q_start=75)
    with pytest.raises(ValueError, match="`q_start` needs `kv_valid`"):
        sw.sink_window_attention_triton(q.detach(), k, v, sink_tokens=0, window=None, q_start=75)


def test_holes_outside_decode_raise():
    valid = _holes_mask()
    q, k, v = make_inputs(5, 4, 2, 5, 90, 32)
    with pytest.raises(ValueError, match="has holes.*only decoding"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=0, window=None, kv_valid=valid)
    q, k, v = (t.detach() for t in make_inputs(5, 4, 2, 40, 90, 32))
    with pytest.raises(ValueError, match="has holes.*at most"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=0, window=None, kv_valid=valid)


def test_padding_s_aux():
    _run_case(3, 2, 1, 45, 45, 32, 3, 9, {}, s_aux=True, kv_valid=_padding_mask())


def test_packed_segments():
    seg = torch.tensor([[0] * 10 + [1] * 25 + [2] * 2 + [3] * 8, [5] * 45])
    _run_case(2, 2, 1, 45, 45, 32, 3, 9, {}, segment_ids=seg)
    # more blocks (3 + 2 + 2 of 16 rows) than one row's count plus one per segment (3 + 3): bounded per batch row
    seg = torch.tensor([[0] * 45, [0] * 20 + [1] * 25])
    _run_case(2, 2, 1, 45, 45, 32, 3, 9, {}, segment_ids=seg)


def test_packed_segments_with_padding():
    seg = torch.tensor([[0] * 10 + [1] * 25 + [2] * 10, [0] * 30 + [1] * 15])
    valid = torch.ones(2, 45, dtype=torch.bool)
    valid[0, 40:] = False  # right padding inside the last segment
    valid[1, 30:33] = False  # left padding of the second segment
    _run_case(2, 4, 2, 45, 45, 32, 2, 7, {}, segment_ids=seg, kv_valid=valid)


def test_fully_masked_rows_are_zero():
    valid = torch.zeros(1, 40, dtype=torch.bool)
    valid[0, 25:] = True  # left padding: queries 0..24 see no key
    q, k, v = make_inputs(1, 2, 1, 40, 40, 32)
    out = sw.sink_window_attention_triton(q, k, v, sink_tokens=2, window=5, kv_valid=valid)
    assert torch.isfinite(out).all()
    assert out[:, :, :25].abs().max() == 0
    dq, dk, dv = grads(out, [q, k, v], torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert dq[:, :, :25].abs().max() == 0 and dk[:, :, :25].abs().max() == 0


def test_sdpa_boolean_mask_oracle():
    """Against SDPA with an explicit mask, including padding (fp32, no s_aux / softcap)."""
    valid = _padding_mask()
    for q_len, window in ((45, 9), (12, None)):
        q, k, v = make_inputs(3, 4, 2, q_len, 45, 32)
        out = sw.sink_window_attention_triton(q, k, v, sink_tokens=3, window=window, kv_valid=valid)
        mask = visibility_mask(3, q_len, 45, 3, window, kv_valid=valid)
        want = sdpa_oracle(q.detach(), k.detach(), v.detach(), mask)
        torch.testing.assert_close(out.detach(), want, atol=2e-5, rtol=2e-5)
        grad_out = torch.randn_like(out)
        got = grads(out, [q, k, v], grad_out)
        ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expect = grads(sdpa_oracle(*ref_in, mask), ref_in, grad_out)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_other_block_sizes(monkeypatch):
    """Block sizes that differ between the two loop levels (32 outer / 16 inner and the reverse)."""
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "fwd_m", 32)
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "dq_m", 32)
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "dkdv_m", 32)
    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "split_min_keys", 64)
    _run_case(1, 2, 1, 77, 77, 32, 5, 21, {})
    seg = torch.tensor([[0] * 30 + [1] * 47])
    _run_case(1, 2, 1, 77, 77, 32, 5, 21, {}, segment_ids=seg)
    _run_case(1, 4, 2, 3, 77, 32, 5, 21, {})  # decode path with other splits


def test_custom_op_and_compile():
    q, k, v = make_inputs(1, 2, 1, 20, 20, 32)
    torch.library.opcheck(torch.ops.hf_longctx.sink_window_fwd.default,
                          (q, k, v, None, None, 0, 2, 6, 32**-0.5, 0.0))

    def fn(q, k, v):
        return sw.sink_window_attention_triton(q, k, v, sink_tokens=2, window=6).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), [q, k, v])
    want = torch.autograd.grad(fn(q, k, v), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_errors():
    q, k, v = make_inputs(1, 2, 1, 8, 8, 32)
    bad = torch.randn(1, 2, 8, 40)
    with pytest.raises(ValueError, match="head_dim"):
        sw.sink_window_attention_triton(bad, bad[:, :1], bad[:, :1], sink_tokens=1, window=4)
    holes = torch.ones(1, 8, dtype=torch.bool)
    holes[0, 3] = False
    with pytest.raises(ValueError, match="kv_valid"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=1, window=4, kv_valid=holes)
    with pytest.raises(ValueError, match="window"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=1, window=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=-1, window=4)
    with pytest.raises(ValueError, match="heads"):
        sw.sink_window_attention_triton(q[:, :1].expand(1, 3, 8, 32), torch.randn(1, 2, 8, 32),
                                        torch.randn(1, 2, 8, 32), sink_tokens=1, window=4)
    with pytest.raises(ValueError, match="segment_ids"):
        sw.sink_window_attention_triton(q[:, :, :4], k, v, sink_tokens=1, window=4,
                                        segment_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="s_aux"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=1, window=4, s_aux=torch.zeros(3))
    with pytest.raises(ValueError, match="softcap"):
        sw.sink_window_attention_triton(q, k, v, sink_tokens=1, window=4, softcap=-1.0)


# ------------------------------------------------------------------------------------------------
# GPU tests (compiled kernels, full size)
# ------------------------------------------------------------------------------------------------
def _err(a, b):
    d = (a.float() - b.float()).abs()
    return d.max().item(), d.mean().item()


def _check_2x(name, ours, base, oracle):
    """Error of ours vs the fp32 oracle <= 2x the error of the same-dtype PyTorch computation.

    Mean absolute error: 2x. Max absolute error: 2x plus one bf16/fp16 ulp of the largest oracle value
    (both results are rounded to 16 bits at the end; a single rounding step must not decide the test).
    """
    mo, ao = _err(ours, oracle)
    mb, ab = _err(base, oracle)
    scale = oracle.float().abs().max().item() + 1e-6
    ulp = scale * (2.0**-8 if ours.dtype == torch.bfloat16 else 2.0**-11)
    print(f"{name}: ours max {mo:.3e} mean {ao:.3e} | torch same-dtype max {mb:.3e} mean {ab:.3e}")
    assert mo <= 2 * mb + ulp, f"{name}: max error {mo:.3e} > 2 x {mb:.3e} + {ulp:.1e}"
    assert ao <= 2 * ab + 1e-6 * scale, f"{name}: mean error {ao:.3e} > 2 x {ab:.3e}"


def _gpu_compare(batch, heads, kv_heads, q_len, kv_len, dim, sink, window, dtype=torch.bfloat16, *,
                 kv_valid=None, segment_ids=None, softcap=None, s_aux=False, backward=True, check_reference=True):
    dev = torch.device("cuda")
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype, device=dev, seed=q_len + dim)
    aux = (torch.randn(heads, device=dev) * 2).to(dtype).requires_grad_() if s_aux else None
    kw = dict(sink_tokens=sink, window=window, softcap=softcap, s_aux=aux, kv_valid=kv_valid,
              segment_ids=segment_ids)
    inputs = [q, k, v] + ([aux] if s_aux else [])
    out = sw.sink_window_attention_triton(q, k, v, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    got = grads(out, inputs, grad_out) if backward else []

    use_sdpa = softcap is None and not s_aux
    mask = visibility_mask(batch, q_len, kv_len, sink, window, kv_valid, segment_ids, device=dev)
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    low = [t.detach().clone().requires_grad_() for t in inputs]
    if use_sdpa:  # fp32 oracle and same-dtype baseline: SDPA with the explicit mask
        oracle = sdpa_oracle(*f32[:3], mask)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            base = sdpa_oracle(*low[:3], mask)
    else:  # oracle: the reference in fp32; baseline: eager attention in the inputs' dtype
        oracle = reference.sink_window_attention(*f32[:3], **dict(kw, s_aux=f32[3] if s_aux else None))
        base = eager_attention(*low[:3], mask, softcap=softcap, s_aux=low[3] if s_aux else None)
    live = torch.isfinite(oracle)
    assert live.all()
    _check_2x("out", out, base, oracle)
    if check_reference and use_sdpa:
        with torch.no_grad():
            ref = reference.sink_window_attention(*[t.detach().float() for t in (q, k, v)], **kw)
        torch.testing.assert_close(ref, oracle.detach(), atol=1e-4, rtol=1e-4)
    if backward:
        want = grads(oracle, f32, grad_out.float())
        base_g = grads(base, low, grad_out)
        for name, a, b, w in zip(["dq", "dk", "dv", "ds_aux"], got, base_g, want):
            _check_2x(name, a, b, w)


@pytest.mark.cuda
def test_cuda_full_shape_8k():
    _gpu_compare(1, 32, 8, 8192, 8192, 128, 128, 4096)


@pytest.mark.cuda
def test_cuda_odd_lengths_and_offsets():
    _gpu_compare(2, 8, 2, 1000, 1000, 128, 4, 300)  # odd length, B=2
    _gpu_compare(1, 8, 2, 257, 3001, 128, 128, 1024)  # chunked prefill (q offset)
    _gpu_compare(1, 8, 8, 7, 7, 64, 2, 3)


@pytest.mark.cuda
def test_cuda_decode():
    _gpu_compare(2, 32, 8, 1, 20000, 128, 128, 4096)
    _gpu_compare(1, 32, 8, 1, 5000, 128, 4, None, backward=False)
    _gpu_compare(1, 32, 8, 8, 9000, 128, 128, 4096)


@pytest.mark.cuda
@pytest.mark.parametrize("q_len", [1, 5])
def test_cuda_decode_with_holes(q_len):
    """Holes in kv_valid on the decode path (32K keys, GQA 4, bf16) against the fp32 reference: dense, and the
    sink + window view that self-speculation drafts through."""
    S = 32768
    valid = torch.ones(4, S, dtype=torch.bool, device="cuda")
    valid[0, :100] = False
    valid[:, 20000:30000:7] = False
    valid[2, S - 40:S - 20:3] = False
    q, k, v = (t.detach() for t in make_inputs(4, 32, 8, q_len, S, 128, torch.bfloat16, device="cuda", seed=q_len))
    for sink, window in [(0, None), (4, 1020)]:
        with torch.no_grad():
            out = sw.sink_window_attention_triton(q, k, v, sink_tokens=sink, window=window, kv_valid=valid)
        ref = reference.sink_window_attention(q.float(), k.float(), v.float(), sink_tokens=sink, window=window,
                                              kv_valid=valid)
        assert _err(out, ref)[0] < 2e-2, (sink, window, _err(out, ref))


@pytest.mark.cuda
def test_cuda_static_block_with_q_start():
    """A verification block of 5 query rows at slots from a device counter (q_start), 32K keys with holes, bf16,
    against the fp32 reference on the buffer cut after the queries."""
    S, start = 32768, 30000
    valid = torch.ones(4, S, dtype=torch.bool, device="cuda")
    valid[0, :100] = False
    valid[:, 20000:29000:7] = False
    valid[:, start + 5:] = False
    q, k, v = (t.detach() for t in make_inputs(4, 32, 8, 5, S, 128, torch.bfloat16, device="cuda", seed=7))
    counter = torch.tensor([start], device="cuda")
    for sink, window in [(0, None), (4, 1020)]:
        with torch.no_grad():
            out = sw.sink_window_attention_triton(q, k, v, sink_tokens=sink, window=window, kv_valid=valid,
                                                  q_start=counter)
        cut = slice(0, start + 5)
        ref = reference.sink_window_attention(q.float(), k[:, :, cut].float(), v[:, :, cut].float(), sink_tokens=sink,
                                              window=window, kv_valid=valid[:, cut])
        assert _err(out, ref)[0] < 2e-2, (sink, window, _err(out, ref))


@pytest.mark.cuda
def test_cuda_padding_and_packing():
    valid = torch.ones(2, 3000, dtype=torch.bool, device="cuda")
    valid[0, :333] = False
    valid[1, 2500:] = False
    _gpu_compare(2, 8, 2, 3000, 3000, 128, 64, 700, kv_valid=valid)
    _gpu_compare(2, 8, 2, 1, 3000, 128, 64, 700, kv_valid=valid, backward=False)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate([700, 1, 1299, 1000])]).to("cuda")[None]
    _gpu_compare(1, 8, 2, 3000, 3000, 128, 64, 500, segment_ids=seg)


@pytest.mark.cuda
def test_cuda_s_aux_softcap_fp16():
    _gpu_compare(1, 8, 2, 2000, 2000, 128, 16, 512, s_aux=True, softcap=30.0)
    _gpu_compare(1, 8, 2, 2000, 2000, 128, 16, 512, dtype=torch.float16)


@pytest.mark.cuda
def test_cuda_dense_mode():
    _gpu_compare(1, 16, 4, 4096, 4096, 128, 0, None)


@pytest.mark.cuda
def test_cuda_torch_compile():
    q, k, v = make_inputs(1, 8, 2, 1024, 1024, 128, torch.bfloat16, device=torch.device("cuda"))

    def fn(q, k, v):
        return sw.sink_window_attention_triton(q, k, v, sink_tokens=4, window=256).float().square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), [q, k, v])
    want = torch.autograd.grad(fn(q, k, v), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [64, 256])
def test_cuda_head_dims(dim):
    _gpu_compare(1, 8, 2, 1500, 1500, dim, 16, 400)


@pytest.mark.cuda
def test_cuda_forward_32k():
    dev = torch.device("cuda")
    q, k, v = make_inputs(1, 32, 8, 32768, 32768, 128, torch.bfloat16, device=dev)
    with torch.no_grad():
        out = sw.sink_window_attention_triton(q, k, v, sink_tokens=128, window=4096)
        oracle = reference.sink_window_attention(q.float(), k.float(), v.float(), sink_tokens=128, window=4096,
                                                 query_chunk=1024, key_chunk=2048)
        base = reference.sink_window_attention(q, k, v, sink_tokens=128, window=4096,
                                               query_chunk=1024, key_chunk=2048)
    # the reference rounds only its output to bf16: ours must stay within 2x of that plus bf16 rounding
    mo, _ = _err(out, oracle)
    mb, _ = _err(base, oracle)
    print(f"32K forward: ours max {mo:.3e}, reference-in-bf16 max {mb:.3e}")
    assert mo <= 2 * mb + 4e-3


@pytest.mark.cuda
@pytest.mark.parametrize("variant", sorted(sw.FWD_VARIANTS))
def test_cuda_forward_variants(variant):
    with sw.forward_variant(variant):
        _gpu_compare(1, 8, 2, 3001, 3001, 128, 128, 1024, backward=False)  # odd length, sinks + window
        _gpu_compare(1, 8, 2, 257, 3001, 128, 128, 1024, backward=False)  # q offset
        _gpu_compare(1, 8, 2, 2000, 2000, 128, 16, 512, s_aux=True, softcap=30.0, backward=False)


def test_static_rounds_through_the_kernel_share_one_layout_per_forward(monkeypatch):
    """Self-speculation's graph-captured rounds with the kernel (interpreted) in every static step: greedy tokens
    equal plain generate's, and each forward computes the mask's layout once for all its layers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model

    import hf_longctx as lc

    monkeypatch.setitem(sw.INTERPRET_BLOCKS, "split_min_keys", 16)
    layouts = []
    layout = sw.hole_layout
    monkeypatch.setattr(sw, "hole_layout", lambda *a, **k: (layouts.append(1), layout(*a, **k))[1])
    model = tiny_model("llama", head_dim=32)  # a head size the kernel takes
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    expected = model.generate(**kwargs)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    spec = lc.Speculative(draft="self", draft_kv="streaming:budget=12,sink_tokens=2", num_draft_tokens=3,
                          cuda_graphs=True)
    got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
    assert torch.equal(got, expected)
    assert layouts and len(layouts) <= len(forwards) < len(layouts) * model.config.num_hidden_layers
