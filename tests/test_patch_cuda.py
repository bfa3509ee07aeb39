"""The patched tiny families on a GPU, where `longctx_sink` dispatches to the Triton kernel."""

import warnings

import pytest
import torch
from test_patch import FAMILY_NAMES
from tiny_models import random_ids, tiny_model

import hf_longctx as lc

pytestmark = pytest.mark.cuda
KERNEL_SHAPE = {"hidden_size": 128, "head_dim": 32}  # the Triton kernel takes head_dim 32 and up


def cpu_model(family, dtype=torch.float32):
    return tiny_model(family, **KERNEL_SHAPE).to(dtype)


def cuda_model(family, dtype):
    return cpu_model(family, dtype).cuda()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_window_covering_the_sequence_gives_stock_greedy_tokens(family):
    model = cuda_model(family, torch.float32)
    ids = random_ids(2, 48).cuda()
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the reference on CUDA
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
