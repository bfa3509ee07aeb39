"""Attention functions registered in transformers' attention and mask registries."""

from . import kv, remap, sink
from .kv import KV_ATTENTION_NAME, kv_attention_forward
from .remap import REMAP_ATTENTION_NAME, rope_remap_attention_forward
from .sink import ATTENTION_NAME, sink_attention_forward


def register() -> None:
    """Register every ``longctx_*`` attention implementation (idempotent)."""
    sink.register()
    kv.register()
    remap.register()


__all__ = [
    "ATTENTION_NAME",
    "KV_ATTENTION_NAME",
    "REMAP_ATTENTION_NAME",
    "kv_attention_forward",
    "register",
    "rope_remap_attention_forward",
    "sink_attention_forward",
]
