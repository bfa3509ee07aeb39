"""A causal LM whose attention calls its own softmax instead of transformers' registry.

It has rotary embeddings and causal attention, so the only reason hf-longctx must refuse it is that
a registered attention function would never be called.
"""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class LegacyConfig(PretrainedConfig):
    model_type = "legacy"


class LegacyRotaryEmbedding(nn.Module):
    pass


class LegacyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = 1

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class LegacyForCausalLM(PreTrainedModel):
    config_class = LegacyConfig

    def __init__(self, config):
        super().__init__(config)
        self.rotary = LegacyRotaryEmbedding()
        self.attn = LegacyAttention()

    @classmethod
    def tiny(cls):
        return cls(LegacyConfig())
