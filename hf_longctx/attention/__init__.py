"""Attention functions registered in transformers' attention and mask registries."""

from . import kv, remap, s2, sink, softplus, sparse
from .kv import KV_ATTENTION_NAME, kv_attention_forward
from .remap import REMAP_ATTENTION_NAME, rope_remap_attention_forward
from .s2 import S2_ATTENTION_NAME, s2_attention_forward
from .sink import ATTENTION_NAME, sink_attention_forward
from .softplus import SOFTPLUS_ATTENTION_NAME, softplus_attention_forward
from .sparse import SPARSE_ATTENTION_NAME, sparse_attention_forward


def register() -> None:
    """Register every ``longctx_*`` attention implementation (idempotent)."""
    sink.register()
    kv.register()
    remap.register()
    s2.register()
    softplus.register()
    sparse.register()


__all__ = [
    "ATTENTION_NAME",
    "KV_ATTENTION_NAME",
    "REMAP_ATTENTION_NAME",
    "S2_ATTENTION_NAME",
    "SOFTPLUS_ATTENTION_NAME",
    "SPARSE_ATTENTION_NAME",
    "kv_attention_forward",
    "register",
    "rope_remap_attention_forward",
    "s2_attention_forward",
    "sink_attention_forward",
    "softplus_attention_forward",
    "sparse_attention_forward",
]
