"""Triton softplus attention (hf_longctx.kernels.softplus) against the PyTorch reference.

Unmarked tests run through the Triton interpreter on CPU (TRITON_INTERPRET=1, tiny odd shapes, fp32);
``@pytest.mark.cuda`` tests run the compiled kernels at full size with the bf16 rule (error against the fp32
reference at most twice that of the bf16 reference).
"""

from __future__ import annotations

import pytest
import torch

from hf_longctx.kernels import softplus as sp
from hf_longctx.kernels.reference_softplus import row_scale, softplus_attention, unit, visible_counts

pytestmark = pytest.mark.skipif(sp.triton is None, reason="triton is not installed")


def inputs(B, H, Hkv, Sq, Skv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_()  # noqa: E731
    return make(B, H, Sq, D), make(B, Hkv, Skv, D), make(B, Hkv, Skv, D)


def out_and_grads(fn, q, k, v, grad, **kwargs):
    """(out, dq, dk, dv) of ``fn`` for the output gradient ``grad``."""
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def run_both(q, k, v, **kwargs):
    """(Triton results, reference results) on the same inputs and the same output gradient."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
    return [out_and_grads(fn, q, k, v, grad, **kwargs) for fn in (sp.softplus_attention_triton, softplus_attention)]


def run_vs_fp32(q, k, v, **kwargs):
    """(Triton results on 16-bit inputs, fp32 reference results on the same values and output gradient)."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    return (out_and_grads(sp.softplus_attention_triton, q, k, v, grad, **kwargs),
            out_and_grads(softplus_attention, *fp32, grad.float(), **kwargs))


def assert_match(got, expected, atol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert torch.isfinite(a).all(), name
        err = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        assert err <= atol * max(1.0, scale), f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 1, 37, 37, 32), (2, 4, 2, 5, 29, 32), (1, 2, 2, 1, 21, 48)])
def test_matches_reference(reweight, shape):
    got, expected = run_both(*inputs(*shape), reweight=reweight)
    assert_match(got, expected, 1e-4)


def padded_and_packed(seed):
    """(q, k, v) of 2 x 29 tokens and the masks to test on them: a padding mask (row 0 left-padded by 6, row 1
    right-padded by 9) and packed sequences (segment ids restarting inside each row)."""
    valid = torch.ones(2, 29, dtype=torch.bool)
    valid[0, :6] = False
    valid[1, 20:] = False
    segments = torch.tensor([[0] * 10 + [1] * 12 + [2] * 7, [0] * 3 + [1] * 26])
    return inputs(2, 4, 2, 29, 29, 32, seed=seed), [dict(kv_valid=valid), dict(segment_ids=segments)]


@pytest.mark.parametrize("reweight", [False, True])
def test_padding_and_packed_sequences(reweight):
    (q, k, v), masks = padded_and_packed(seed=1)
    for mask in masks:
        got, expected = run_both(q, k, v, reweight=reweight, **mask)
        assert_match(got, expected, 1e-4)
        if "kv_valid" in mask:  # the left-padded query rows see no key: zeros
            assert torch.equal(got[0][0, :, :6], torch.zeros_like(got[0][0, :, :6]))


@pytest.mark.parametrize("reweight", [False, True])
def test_packed_rows_need_more_blocks_than_one_row(reweight):
    """Segments of two rows span more query blocks (3 + 2 + 2 at 16 rows a block) than one row's count plus one
    per segment (3 + 3): the work table is bounded per batch row (it was not: blocks were left unwritten)."""
    q, k, v = inputs(2, 4, 2, 45, 45, 32, seed=3)
    segments = torch.tensor([[0] * 45, [0] * 20 + [1] * 25])
    got, expected = run_both(q, k, v, reweight=reweight, segment_ids=segments)
    assert_match(got, expected, 1e-4)


def test_power_one_and_uniform_rows():
    q, k, v = inputs(1, 2, 1, 19, 19, 32, seed=2)
    got, expected = run_both(q, k, v, reweight=True, power=1)
    assert_match(got, expected, 1e-4)
    zero_q = torch.zeros_like(q).requires_grad_()  # every row uniform: LSSAR rows past the third give zeros
    got, expected = run_both(zero_q, k, v, reweight=True)
    assert_match(got, expected, 1e-4)


def test_bad_input_raises():
    q, k, v = inputs(1, 2, 1, 4, 4, 32)
    with pytest.raises(ValueError, match="power"):
        sp.softplus_attention_triton(q, k, v, power=100)
    with pytest.raises(ValueError, match="head_dim"):
        sp.softplus_attention_triton(*inputs(1, 2, 1, 4, 4, 20))


def test_interpreter_blocks_unequal(monkeypatch):
    """BLOCK_M != BLOCK_N (as on the GPU: 128 x 64 forward, 32 x 128 dK/dV): several masked key blocks per
    query block and several masked row blocks per key block."""
    q, k, v = inputs(1, 2, 1, 45, 45, 32, seed=5)
    for m, n in ((32, 16), (16, 32)):
        monkeypatch.setitem(sp.INTERPRET_BLOCKS, "m", m)
        monkeypatch.setitem(sp.INTERPRET_BLOCKS, "n", n)
        for reweight in (False, True):
            got, expected = run_both(q, k, v, reweight=reweight)
            assert_match(got, expected, 1e-4)


def gpu_blocks(kinds=("fwd", "dq", "stats", "dkdv", "fused")) -> list:
    """Every (BLOCK_M, BLOCK_N) of the GPU autotuning spaces of ``kinds`` (both head-dim ranges)."""
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for d in (128, 256)
                   for kind in kinds for c in sp._configs(kind, d)})


@pytest.mark.parametrize("blocks", gpu_blocks(), ids=lambda b: f"{b[0]}x{b[1]}")
def test_interpreter_gpu_blocks(monkeypatch, blocks):
    """The block shapes the GPU runs (not only the interpreter's 16 x 16): chunked prefill with GQA 2:1, a
    partial last key block and query rows that start inside a key block; and a decode row over 2-10 key blocks."""
    monkeypatch.setitem(sp.INTERPRET_BLOCKS, "m", blocks[0])
    monkeypatch.setitem(sp.INTERPRET_BLOCKS, "n", blocks[1])
    for shape in ((1, 4, 2, 40, 150, 32), (1, 2, 1, 1, 150, 32)):
        q, k, v = inputs(*shape, seed=7)
        for reweight in (False, True):
            got, expected = run_both(q, k, v, reweight=reweight)
            assert_match(got, expected, 1e-4)


def grads_with(variant, q, k, v, grad, **kwargs):
    """(dq, dk, dv) of the Triton kernels with the backward schedule ``variant``."""
    with sp.backward_variant(variant):
        return out_and_grads(sp.softplus_attention_triton, q, k, v, grad, **kwargs)[1:]


def assert_fused_matches(q, k, v, **kwargs):
    """The fused backward's dq, dk, dv against the fp32 reference (1e-4, as every interpreter test) and against
    the split backward (1e-5: the same fp32 terms, summed in another order)."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
    fused = grads_with("fused", q, k, v, grad, **kwargs)
    split = grads_with("split", q, k, v, grad, **kwargs)
    exact = out_and_grads(softplus_attention, q, k, v, grad, **kwargs)[1:]
    placeholder = torch.zeros(())  # assert_match compares (out, dq, dk, dv): the outputs are not under test here
    assert_match((placeholder, *fused), (placeholder, *exact), 1e-4)
    assert_match((placeholder, *fused), (placeholder, *split), 1e-5)


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 2, 37, 37, 32), (2, 4, 2, 5, 29, 32), (1, 2, 2, 1, 21, 48)],
                         ids=["gqa-odd", "chunked-prefill", "decode-padded-d"])
def test_fused_backward(reweight, shape):
    """Fused backward (dq by atomics from the key-block kernel): GQA 2:1, odd lengths, a query block that starts
    inside a key block, a decode row, a head dim that is not a power of two."""
    assert_fused_matches(*inputs(*shape, seed=11), reweight=reweight)


@pytest.mark.parametrize("reweight", [False, True])
def test_fused_backward_padding_and_packed_sequences(reweight):
    (q, k, v), masks = padded_and_packed(seed=12)
    for mask in masks:
        assert_fused_matches(q, k, v, reweight=reweight, **mask)


@pytest.mark.parametrize("blocks", gpu_blocks(("fused",)), ids=lambda b: f"{b[0]}x{b[1]}")
def test_fused_backward_gpu_blocks(monkeypatch, blocks):
    """The fused kernel's GPU block shapes (e.g. 16 or 32 rows x 128 keys): many row blocks per key block, a partial
    last key block, chunked prefill with GQA."""
    monkeypatch.setitem(sp.INTERPRET_BLOCKS, "m", blocks[0])
    monkeypatch.setitem(sp.INTERPRET_BLOCKS, "n", blocks[1])
    q, k, v = inputs(1, 4, 2, 40, 150, 32, seed=13)
    for reweight in (False, True):
        assert_fused_matches(q, k, v, reweight=reweight)


def test_backward_variant_selection():
    assert set(sp.BWD_VARIANTS) == {"split", "fused"}
    with pytest.raises(ValueError, match="backward variant"):
        with sp.backward_variant("nope"):
            pass
    with sp.backward_variant("split"):
        assert sp._BWD_SCHEDULES.name == "split"
    assert sp._BWD_SCHEDULES.name == "fused"  # the default is restored


def test_deterministic_mode_runs_split(monkeypatch):
    """The default (fused) backward adds dq by atomics; under torch.use_deterministic_algorithms(True) the backward
    launches the split schedule's kernels instead."""
    launched = []
    run = sp._run
    monkeypatch.setattr(sp, "_run", lambda kind, *args: (launched.append(kind), run(kind, *args)))
    q, k, v = inputs(1, 2, 1, 20, 20, 32, seed=5)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    out_and_grads(sp.softplus_attention_triton, q, k, v, grad)
    assert launched[1:] == ["stats", "fused"]
    launched.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    out_and_grads(sp.softplus_attention_triton, q, k, v, grad)
    assert launched[1:] == ["dq", "dkdv"]


if sp.triton is not None:
    @sp.triton.jit
    def _tile_probe(X, A, SIG):
        """a and sig of the kernels' score tile for x = the 16 x 16 values at X (k = identity)."""
        tl = sp.tl
        r = tl.arange(0, 16)
        x = tl.load(X + r[:, None] * 16 + r[None, :])
        eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
        a, sig = sp._tile(x, eye, r, r, 0, 16, False, True, False, tl.float32, "ieee")
        tl.store(A + r[:, None] * 16 + r[None, :], a)
        tl.store(SIG + r[:, None] * 16 + r[None, :], sig)


def test_softplus_polynomials_over_the_logit_range():
    """The kernels' softplus (one exp2 + a polynomial) and sigmoid against torch over |x| <= 100 (log2 units;
    the largest logit is log(D) log2(N) < 90 at D=256, N=2^20): relative error < 2e-5 on both."""
    x = torch.cat([torch.linspace(-100, 100, 4096 - 256), torch.linspace(-2, 2, 256)]).reshape(16, 16, 16)
    ln2 = 0.6931471805599453
    for tile in x:
        tile = tile.contiguous()
        a, sig = torch.empty_like(tile), torch.empty_like(tile)
        _tile_probe[(1,)](tile, a, sig)
        xs = tile.double() * ln2
        want_a = torch.nn.functional.softplus(xs) / ln2
        want_sig = torch.sigmoid(xs)
        assert ((a.double() - want_a).abs() / want_a).max().item() < 2e-5
        assert ((sig.double() - want_sig).abs() / want_sig).max().item() < 2e-5


# GPU tests: compiled kernels, the bf16 rule against a same-dtype PyTorch computation
# ------------------------------------------------------------------------------------------------
def eager_softplus(q, k, v, reweight, power=15):
    """Softplus attention as a bf16/fp16 model would run it in PyTorch (dense, no padding): q, k normalised in
    fp32 and rounded, QK^T and W V in the inputs' dtype, softplus / normalisation / re-weighting in fp32 (as
    transformers' eager softmax does), weights rounded to the inputs' dtype. The error bar of the bf16 rule."""
    B, H, S, D = q.shape
    G = H // k.shape[1]
    kk = unit(k).to(k.dtype).repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    cos = torch.matmul(unit(q).to(q.dtype), kk.transpose(-1, -2)).float()
    n = visible_counts(B, S, k.shape[2], q.device)[:, None, :, None]
    mask = torch.ones(S, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - S)
    a = torch.nn.functional.softplus(cos * row_scale(n, D)).masked_fill(~mask, 0.0)
    w = a / a.sum(-1, keepdim=True)
    if reweight:
        y = torch.relu(n * w - (n > 3).float()).masked_fill(~mask, 0.0)
        r = (y / y.detach().amax(-1, keepdim=True).clamp_min(1e-30)) ** power
        w = r / r.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.matmul(w.to(q.dtype), vv)


def _check_2x(name, ours, base, oracle):
    """Max |error| vs the fp32 oracle <= 2x that of the same-dtype computation plus one 16-bit ulp of the
    largest oracle value (both results are rounded to 16 bits last); mean |error| <= 2x. Prints both."""
    d_ours = (ours.float() - oracle).abs()
    d_base = (base.float() - oracle).abs()
    scale = oracle.abs().max().item() + 1e-6
    ulp = scale * (2.0**-8 if ours.dtype == torch.bfloat16 else 2.0**-11)
    print(f"{name}: ours max {d_ours.max().item():.3e} mean {d_ours.mean().item():.3e} | same-dtype torch max "
          f"{d_base.max().item():.3e} mean {d_base.mean().item():.3e} | scale {scale:.3e}")
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    assert d_ours.max().item() <= 2 * d_base.max().item() + ulp, name
    assert d_ours.mean().item() <= 2 * d_base.mean().item() + 1e-6 * scale, name


@pytest.fixture
def first_config_only(monkeypatch):
    """One compile per kernel (HF_LONGCTX_AUTOTUNE=0) so the GPU tests finish quickly; test_cuda_every_config
    runs the others."""
    monkeypatch.setenv("HF_LONGCTX_AUTOTUNE", "0")
    monkeypatch.setattr(sp, "_TUNED", {})


@pytest.mark.cuda
@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8, 2, 1000, 1000, 128), (2, 4, 4, 777, 2048, 64), (1, 4, 1, 1, 3000, 128)])
def test_cuda_same_dtype_rule(first_config_only, reweight, dtype, shape):
    q, k, v = inputs(*shape, dtype=dtype, device="cuda", seed=3)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
    out = sp.softplus_attention_triton(q, k, v, reweight=reweight)
    ours = (out, *torch.autograd.grad(out, (q, k, v), grad))
    base_out = eager_softplus(q, k, v, reweight)
    base = (base_out, *torch.autograd.grad(base_out, (q, k, v), grad))
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = softplus_attention(*fp32, reweight=reweight)
    exact = (ref, *torch.autograd.grad(ref, fp32, grad.float()))
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, base, exact):
        _check_2x(f"{shape} reweight={reweight} {name}", a, b, e.detach())


def eager_spans(q, k, v, spans, reweight):
    """``eager_softplus`` run separately on each (batch, start, end) span of a padded / packed batch (Sq == Skv);
    rows outside every span are 0, as the kernels give for padding."""
    out = torch.zeros_like(q)
    for b, lo, hi in spans:
        out[b, :, lo:hi] = eager_softplus(q[b:b + 1, :, lo:hi], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi],
                                          reweight)[0]
    return out


@pytest.mark.cuda
def test_cuda_padding_and_packing(first_config_only):
    """Left padding and packed sequences against the same-dtype computation run per sequence (the bf16 rule)."""
    q, k, v = inputs(2, 8, 2, 700, 700, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    valid = torch.ones(2, 700, dtype=torch.bool, device="cuda")
    valid[0, :123] = False
    segments = torch.tensor([[0] * 300 + [1] * 400, [0] * 650 + [1] * 50], device="cuda")
    cases = (({"kv_valid": valid}, [(0, 123, 700), (1, 0, 700)]),
             ({"segment_ids": segments}, [(0, 0, 300), (0, 300, 700), (1, 0, 650), (1, 650, 700)]))
    for kwargs, spans in cases:
        for reweight in (False, True):
            ours, exact = run_vs_fp32(q, k, v, reweight=reweight, **kwargs)
            grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
            base = out_and_grads(lambda *t: eager_spans(*t, spans, reweight), q, k, v, grad)
            for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, base, exact):
                _check_2x(f"{list(kwargs)[0]} reweight={reweight} {name}", a, b, e.detach())


@pytest.mark.cuda
def test_cuda_every_config(monkeypatch):
    """Each autotuning config of each kernel, run alone (the autotuner may pick any of them), LSSA and LSSAR, under
    the bf16 rule (LSSAR's power 15 amplifies rounding: a fixed 3% bar failed config 1 at 4% while the same-dtype
    PyTorch computation was off by 4.7% on a like shape)."""
    q, k, v = inputs(1, 4, 2, 600, 600, 128, dtype=torch.bfloat16, device="cuda", seed=6)
    spaces = {kind: sp._configs(kind, 128) for kind in ("fwd", "dq", "dkdv")}
    for kind, space in spaces.items():
        for index in range(1, len(space)):
            configs = {key: configs[:1] for key, configs in spaces.items()}
            configs[kind] = [space[index]]
            monkeypatch.setattr(sp, "_TUNED", {})
            monkeypatch.setattr(sp, "_configs", lambda key, d, configs=configs: configs[key])
            for reweight in (False, True):
                got, exact = run_vs_fp32(q, k, v, reweight=reweight)
                grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
                base = out_and_grads(lambda *t: eager_softplus(*t, reweight), q, k, v, grad)
                for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, base, exact):
                    _check_2x(f"{kind} config {index} reweight={reweight} {name}", a, b, e.detach())


@pytest.mark.cuda
@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 2, 1000, 1000, 128), (2, 4, 4, 777, 2048, 64), (1, 4, 1, 1, 3000, 128)])
def test_cuda_fused_backward(monkeypatch, reweight, shape):
    """The fused backward under the bf16 rule (as test_cuda_same_dtype_rule), with autotuning on: each tuning run of
    the fused kernel must start from a zeroed dq buffer (reset_to_zero), or the chosen run's dq is a multiple."""
    monkeypatch.setenv("HF_LONGCTX_AUTOTUNE", "1")
    monkeypatch.setattr(sp, "_TUNED", {})
    q, k, v = inputs(*shape, dtype=torch.bfloat16, device="cuda", seed=3)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device, q.dtype)
    with sp.backward_variant("fused"):
        ours = out_and_grads(sp.softplus_attention_triton, q, k, v, grad, reweight=reweight)
    base = out_and_grads(lambda *t: eager_softplus(*t, reweight), q, k, v, grad)
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact = out_and_grads(softplus_attention, *fp32, grad.float(), reweight=reweight)
    for name, a, b, e in list(zip(("out", "dq", "dk", "dv"), ours, base, exact))[1:]:
        _check_2x(f"fused {shape} reweight={reweight} {name}", a, b, e.detach())
