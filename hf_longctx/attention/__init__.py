"""Attention functions registered in transformers' attention and mask registries."""

from .sink import ATTENTION_NAME, register, sink_attention_forward

__all__ = ["ATTENTION_NAME", "register", "sink_attention_forward"]
