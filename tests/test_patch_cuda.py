"""The patched tiny families on a GPU, where `longctx_sink` dispatches to the Triton kernel."""

import warnings

import pytest
import torch
from test_patch import FAMILY_NAMES
from tiny_models import random_ids, tiny_model

import hf_longctx as lc
from hf_longctx.attention import sink as sink_module

pytestmark = pytest.mark.cuda
KERNEL_SHAPE = {"hidden_size": 128, "head_dim": 32}  # the Triton kernel takes head_dim 32 and up


def cpu_model(family, dtype=torch.float32):
    return tiny_model(family, **KERNEL_SHAPE).to(dtype)


def cuda_model(family, dtype):
    return cpu_model(family, dtype).cuda()


def test_float32_on_cuda_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(sink_module, "_warned_fallbacks", set())  # the warning is once per reason
    model = lc.patch(cuda_model("llama", torch.float32), attention="sink:16")
    ids = random_ids(1, 40)
    with pytest.warns(UserWarning, match="float32"):
        got = model(ids.cuda()).logits.cpu()
    expected = lc.patch(cpu_model("llama"), attention="sink:16")(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_window_covering_the_sequence_gives_stock_greedy_tokens(family):
    model = cuda_model(family, torch.bfloat16)
    with torch.no_grad():  # peaked logits: bf16 rounding differences cannot flip the greedy choice
        model.get_output_embeddings().weight.mul_(8)
    ids = random_ids(2, 48).cuda()
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Triton path, not the reference fallback
        lc.patch(model, attention="sink:4096")
        tokens = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_window_error_within_twice_the_reference_error(family, dtype):
    """Against the float32 result, the Triton path in `dtype` errs at most 2x the PyTorch path in `dtype`."""
    ids = random_ids(1, 300)
    with torch.no_grad():
        truth = lc.patch(cpu_model(family), attention="sink:32,4")(ids).logits
        reference = lc.patch(cpu_model(family, dtype), attention="sink:32,4")(ids).logits.float()
        triton = lc.patch(cuda_model(family, dtype), attention="sink:32,4")(ids.cuda()).logits.float().cpu()
    assert (triton - truth).norm() <= 2 * (reference - truth).norm()


def generate_on(device, kv, ids):
    model = cpu_model("qwen2", torch.bfloat16).to(device)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    if kv is not None:
        lc.patch(model, kv=kv)
    cache = lc.LongCtxCache(model, kv=kv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Triton path, not the reference fallback
        return model.generate(ids.to(device), past_key_values=cache, max_new_tokens=16, do_sample=False).cpu()


@pytest.mark.parametrize("kv", [None, "streaming:24,2"])
def test_long_ctx_cache_on_cuda_gives_the_cpu_tokens(kv):
    """LongCtxCache (streaming eviction: longctx_kv through the Triton kernel) on the GPU, against the CPU."""
    ids = random_ids(2, 64)
    assert torch.equal(generate_on("cuda", kv, ids), generate_on("cpu", kv, ids))


def test_score_based_eviction_runs_on_cuda():
    """SnapKV on the GPU: its top-k over bf16 scores may break near-ties differently from the CPU, so the
    tokens are compared loosely; the run must take the Triton path and mostly agree."""
    ids = random_ids(2, 64)
    kv = "snapkv:budget=40,sink_tokens=2,window=8"
    gpu, cpu = generate_on("cuda", kv, ids), generate_on("cpu", kv, ids)
    assert gpu.shape == cpu.shape == (2, 80)
    assert (gpu[:, 64:] == cpu[:, 64:]).float().mean() >= 0.75
