"""The Triton remap kernel (Self-Extend, dual-chunk) against the PyTorch reference.

Run by `make test` under TRITON_INTERPRET=1 (small shapes); the `cuda` tests run it compiled on a GPU.
"""

import pytest
import torch

from hf_longctx.kernels import remap as remap_kernel
from hf_longctx.kernels.reference import sink_window_attention
from hf_longctx.kernels.reference_remap import RemapScheme, remap_attention
from hf_longctx.kernels.remap import remap_attention_triton

pytestmark = pytest.mark.skipif(remap_kernel.triton is None, reason="triton is not installed")

SCHEMES = {
    "self_extend": RemapScheme("self_extend", window=9, group=4),
    "dual_chunk": RemapScheme("dual_chunk", chunk_size=26, local_size=7),
}


def inv_freq(rotary_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)


def inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=generator, device=device).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, kv_len, dim, generator=generator, device=device).to(dtype) for _ in range(2))
    return q, k, v  # q non-contiguous, as models hand it over


def compare(q, k, v, frequencies, scheme, tol, **kwargs):
    expected = remap_attention(q, k, v, inv_freq=frequencies, scheme=scheme, **kwargs)
    got = remap_attention_triton(q, k, v, inv_freq=frequencies, scheme=scheme, **kwargs)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("q_len", [70, 11, 1])  # prefill, a chunk of a chunked prefill, decode
def test_matches_reference(scheme, q_len):
    q, k, v = inputs(2, 4, 2, q_len, 70, 32)
    compare(q, k, v, inv_freq(32), SCHEMES[scheme], 1e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_partial_rotary_softcap_and_padding(scheme):
    q, k, v = inputs(3, 2, 1, 45, 45, 32)
    valid = torch.ones(3, 45, dtype=torch.bool)
    valid[0, :7] = False  # left padding
    valid[1, 38:] = False  # right padding
    valid[2, :] = False  # no real token: zeros
    out = compare(q, k, v, inv_freq(24), SCHEMES[scheme], 1e-5, softcap=4.0, kv_valid=valid)
    assert out[2].abs().max() == 0


def test_packed_sequences():
    q, k, v = inputs(1, 4, 2, 60, 60, 16)
    segments = torch.cat([torch.zeros(25), torch.ones(35)]).long()[None]
    compare(q, k, v, inv_freq(16), SCHEMES["dual_chunk"], 1e-5, segment_ids=segments)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    q, k, v = inputs(1, 4, 2, 50, 50, 64, dtype=dtype)
    compare(q, k, v, inv_freq(64), SCHEMES["self_extend"], 2e-2)


def test_window_or_chunk_covering_the_sequence_is_stock_attention():
    q, k, v = inputs(1, 4, 2, 40, 40, 32)
    dense = sink_window_attention(q, k, v, sink_tokens=0, window=None)
    schemes = (RemapScheme("self_extend", window=40, group=64), RemapScheme("dual_chunk", chunk_size=60, local_size=8))
    for scheme in schemes:
        torch.testing.assert_close(remap_attention_triton(q, k, v, inv_freq=inv_freq(32), scheme=scheme), dense,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("q_len", [3000, 1])
def test_gpu_matches_reference(scheme, q_len):
    big = {"self_extend": RemapScheme("self_extend", window=512, group=8),
           "dual_chunk": RemapScheme("dual_chunk", chunk_size=896, local_size=128)}[scheme]
    q, k, v = inputs(1, 8, 2, q_len, 3000, 64, dtype=torch.bfloat16, device="cuda")
    compare(q, k, v, inv_freq(64).cuda(), big, 2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["self_extend:window=64,group=4", "dual_chunk:chunk_size=64,local_size=16"])
def test_gpu_model_path_uses_the_kernel_and_decodes_like_a_full_forward(spec):
    import hf_longctx as lc
    from tiny_models import random_ids, tiny_model

    model = lc.patch(tiny_model("llama").cuda(), rope=spec)
    ids = random_ids(1, 150).cuda()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, 149 + step], atol=1e-3, rtol=1e-3)
