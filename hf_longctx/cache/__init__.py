"""KV cache: ``LongCtxCache`` (preallocated layers, logical vs stored length), eviction policies, and
graph-captured decoding over it (``graph_generate``)."""

from .cache import LongCtxCache
from .graphs import GraphDecoder, graph_generate
from .layers import LongCtxLayer
from .policies import EvictionPolicy, make_policies

__all__ = ["EvictionPolicy", "GraphDecoder", "LongCtxCache", "LongCtxLayer", "graph_generate", "make_policies"]
