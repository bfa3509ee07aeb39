"""Tiny random causal LMs of the supported families, built in the tests (no downloads).

Every model has GQA (4 query heads, 2 key/value heads), 2 layers and float32 weights. Gemma 2 keeps
its hybrid layout (one local sliding-window layer of 16 tokens, one global layer) and its logit
soft-capping; the others have no native sliding window.
"""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"sliding_window": None}),
}

# The stock implementation each family is compared with: sdpa ignores Gemma 2's soft-capping.
STOCK_ATTENTION = {name: "eager" if name == "gemma2" else "sdpa" for name in FAMILIES}


def tiny_model(family: str, attn_implementation: str | None = None, seed: int = 0, **overrides):
    """A tiny random model of `family` in eval mode, float32, on the CPU; `overrides` go to its config."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation or STOCK_ATTENTION[family])
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
