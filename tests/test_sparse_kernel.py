"""Triton block-sparse kernel (hf_longctx.kernels.block_sparse) against the PyTorch reference.

Unmarked tests run through the Triton interpreter (TRITON_INTERPRET=1, tiny odd shapes); ``cuda`` tests run the
compiled kernel at full size (benchmarks/run_gpu_sparse.sh).
"""

from __future__ import annotations

import pytest
import torch

from hf_longctx.kernels import block_sparse as bsp
from hf_longctx.kernels import reference, reference_sparse as rs
from hf_longctx.sparse import block_topk_index, dense_index, vertical_slash_index

pytestmark = pytest.mark.skipif(bsp.triton is None, reason="triton is not installed")
from test_sparse_reference import random_selection  # noqa: E402


def inputs(B, H, Hkv, S, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, S, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # noqa
    return make(H), make(Hkv), make(Hkv)


@pytest.mark.parametrize("S,H,Hkv,D", [(53, 4, 2, 32), (16, 2, 1, 32), (40, 3, 3, 48)])
def test_forward_backward_match_reference(S, H, Hkv, D):
    q, k, v = inputs(1, H, Hkv, S, D, seed=S)
    sel, _ = random_selection(1, H, S, 16, seed=S, columns=False)
    num, idx = sel.pop("kv_num_blocks"), sel.pop("kv_indices")
    sel.pop("column_count"), sel.pop("column_index")
    ref, ref_lse = rs.block_sparse_attention(q, k, v, num, idx, block_size=16, return_lse=True, **sel)
    out, lse = bsp.block_sparse_attention_triton(q, k, v, num, idx, block_size=16, return_lse=True, **sel)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)


def test_columns_forward():
    q, k, v = inputs(2, 4, 2, 70, 32, seed=3)
    sel, _ = random_selection(2, 4, 70, 16, seed=7, columns=True)
    num, idx = sel.pop("kv_num_blocks"), sel.pop("kv_indices")
    ref = rs.block_sparse_attention(q, k, v, num, idx, block_size=16, **sel)
    out = bsp.block_sparse_attention_triton(q.detach(), k.detach(), v.detach(), num, idx, block_size=16, **sel)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_estimated_vertical_slash_matches_reference():
    q, k, v = inputs(1, 4, 2, 90, 32, seed=4)
    q, k, v = q.detach(), k.detach(), v.detach()
    index = vertical_slash_index(q, k, block_size=16, last_q=8, density=0.3)
    ref = rs.block_sparse_attention(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_all_blocks_equal_dense():
    q, k, v = inputs(1, 4, 2, 45, 32, seed=5)
    index = dense_index(1, 4, 45, 16, "cpu")
    out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    dense = reference.sink_window_attention(q, k, v, sink_tokens=0, window=None)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def test_columns_have_no_backward_and_bad_input():
    q, k, v = inputs(1, 2, 1, 32, 32)
    index = vertical_slash_index(q.detach(), k.detach(), block_size=16, last_q=4, density=0.5)
    out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    with pytest.raises(ValueError, match="block lists only"):
        out.sum().backward()
    with pytest.raises(ValueError, match="block_size"):
        bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, block_size=24)


# Forward schedules (bsp.FWD_VARIANTS): each must give the reference's output and LSE. The backward does not depend
# on the variant (it reads the forward's output and LSE, checked here and once through autograd below).
VARIANTS = sorted(bsp.FWD_VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_variants(variant):
    """Block lists with columns (B=2, GQA: grouped grid across batch rows), D=48 (padded tile: TMA's columns past
    the head dim), G=1, empty rows; then estimator lists (partial width 1) through forward and backward."""
    for B, H, Hkv, S, D, cols in [(2, 4, 2, 70, 32, True), (1, 3, 3, 40, 48, False)]:
        q, k, v = (t.detach() for t in inputs(B, H, Hkv, S, D, seed=S))
        sel, _ = random_selection(B, H, S, 16, seed=S, columns=cols)
        num, idx = sel.pop("kv_num_blocks"), sel.pop("kv_indices")
        ref, ref_lse = rs.block_sparse_attention(q, k, v, num, idx, block_size=16, return_lse=True, **sel)
        with bsp.forward_variant(variant):
            out, lse = bsp.block_sparse_attention_triton(q, k, v, num, idx, block_size=16, return_lse=True, **sel)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, ref_lse)
    q, k, v = inputs(1, 4, 2, 61, 32, seed=6)
    index = block_topk_index(q.detach(), k.detach(), block_size=16, density=0.5)
    ref = rs.block_sparse_attention(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    with bsp.forward_variant(variant):
        out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices,
                                                **index.kernel_kwargs())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)


def test_forward_variant_errors():
    with pytest.raises(ValueError, match="forward variant"):
        with bsp.forward_variant("nope"):
            pass
    assert bsp._FWD_SCHEDULES.name == "prefetch"
    assert bsp._variant_stages(3, 128, 128, 2) == 3 and bsp._variant_stages(3, 128, 256, 2) == 2


# ------------------------------------------------------------------------------------------------ GPU
def _eager(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")).float(), -1).to(q.dtype)
    return p @ v


def _bf16_rule_errors(out, q, k, v, index, lse=None):
    """(max error of ``out`` vs the fp32 reference, max error of bf16 eager attention with the same mask); with
    ``lse``, also checks it against the reference's."""
    S = q.shape[2]
    ref, ref_lse = rs.block_sparse_attention(q.float(), k.float(), v.float(), index.kv_num_blocks, index.kv_indices,
                                             return_lse=True, **index.kernel_kwargs())
    if lse is not None:
        torch.testing.assert_close(lse, ref_lse.detach(), atol=2e-2, rtol=1e-3)
    blocks = rs.selected_blocks(index.kv_num_blocks, index.kv_indices, index.full_kv_num_blocks,
                                index.full_kv_indices, -(-S // 128))
    i = torch.arange(S, device=q.device)
    mask = blocks[:, :, i // 128][:, :, :, i // 128] & (i[None, :] <= i[:, None])
    eager = _eager(q.detach(), k.detach(), v.detach(), mask)
    return (out.float() - ref).abs().max().item(), (eager.float() - ref).abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("S", [4096, 4000])
def test_cuda_bf16_rule(S):
    """bf16 kernel error vs fp32 reference <= 2x the error of bf16 eager attention with the same mask."""
    q, k, v = inputs(1, 8, 2, S, 128, dtype=torch.bfloat16, device="cuda", seed=S)
    index = block_topk_index(q.detach(), k.detach(), block_size=128, density=0.3)
    out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    err, err_eager = _bf16_rule_errors(out, q, k, v, index)
    print(f"S={S} ours max err {err:.3e} eager bf16 {err_eager:.3e}")
    assert err <= 2 * err_eager + 1e-6
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    rf = rs.block_sparse_attention(qf, kf, vf, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    for name, a, b in zip("qkv", torch.autograd.grad(rf, (qf, kf, vf), grad.float()), (dq, dk, dv)):
        rel = ((b.float() - a).norm() / a.norm()).item()
        print(f"d{name} relative error {rel:.3e}")
        assert rel < 2e-2


@pytest.mark.cuda
def test_cuda_dense_selection_equals_sdpa():
    q, k, v = inputs(1, 8, 2, 8192, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    q, k, v = q.detach(), k.detach(), v.detach()
    index = dense_index(1, 8, 8192, 128, "cuda")
    out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2


def test_estimated_block_topk_backward():
    """Estimator lists (partial width 1, full width ceil(density Qb) + 1) through forward and backward."""
    q, k, v = inputs(1, 4, 2, 61, 32, seed=6)
    index = block_topk_index(q.detach(), k.detach(), block_size=16, density=0.5)
    ref = rs.block_sparse_attention(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    out = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices, **index.kernel_kwargs())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)


@pytest.mark.cuda
def test_cuda_estimate_matches_cpu_and_block_mask():
    """The device estimator (bf16 read, float32 sums) picks the CPU's blocks (up to near-ties), without a host
    sync, and its BlockMask (what the benchmark hands FlexAttention) is exactly its selection."""
    S, n = 8192, 64
    q, k, _ = inputs(1, 8, 2, S, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    q, k = q.detach(), k.detach()
    torch.cuda.set_sync_debug_mode("error")
    try:
        index = block_topk_index(q, k, block_size=128, density=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    blocks = rs.selected_blocks(index.kv_num_blocks, index.kv_indices, index.full_kv_num_blocks,
                                index.full_kv_indices, n)
    cpu = block_topk_index(q.cpu(), k.cpu(), block_size=128, density=0.1)
    cpu_blocks = rs.selected_blocks(cpu.kv_num_blocks, cpu.kv_indices, cpu.full_kv_num_blocks, cpu.full_kv_indices, n)
    assert (blocks.cpu() != cpu_blocks).float().mean().item() < 1e-3
    assert torch.equal(index.block_mask(S).to_dense().bool(), blocks)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", sorted(bsp.FWD_VARIANTS))
def test_cuda_forward_variants(variant):
    """(Last in the file: six compiles; benchmarks/run_gpu_sparse.sh gives the cuda tests 50 s.) Each forward
    schedule, compiled, at a medium shape (odd length, GQA 4, D=128 bf16, estimated lists): output
    within the bf16 rule of test_cuda_bf16_rule, LSE equal to the reference's; with columns (vertical-slash lists)
    the same output as the default schedule."""
    S = 4000
    q, k, v = (t.detach() for t in inputs(1, 8, 2, S, 128, dtype=torch.bfloat16, device="cuda", seed=S))
    index = block_topk_index(q, k, block_size=128, density=0.3)
    with bsp.forward_variant(variant):
        out, lse = bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices,
                                                     return_lse=True, **index.kernel_kwargs())
    err, err_eager = _bf16_rule_errors(out, q, k, v, index, lse)
    print(f"{variant}: max err {err:.3e} eager bf16 {err_eager:.3e}")
    assert err <= 2 * err_eager + 1e-6
    vs = vertical_slash_index(q, k, block_size=128, density=0.3)
    base = bsp.block_sparse_attention_triton(q, k, v, vs.kv_num_blocks, vs.kv_indices, **vs.kernel_kwargs())
    with bsp.forward_variant(variant):
        got = bsp.block_sparse_attention_triton(q, k, v, vs.kv_num_blocks, vs.kv_indices, **vs.kernel_kwargs())
    assert (got.float() - base.float()).abs().max().item() <= 1e-2
