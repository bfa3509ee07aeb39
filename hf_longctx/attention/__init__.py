"""Attention functions registered in transformers' attention and mask registries."""

from . import kv, sink
from .kv import KV_ATTENTION_NAME, kv_attention_forward
from .sink import ATTENTION_NAME, sink_attention_forward


def register() -> None:
    """Register every ``longctx_*`` attention implementation (idempotent)."""
    sink.register()
    kv.register()


__all__ = ["ATTENTION_NAME", "KV_ATTENTION_NAME", "kv_attention_forward", "register", "sink_attention_forward"]
