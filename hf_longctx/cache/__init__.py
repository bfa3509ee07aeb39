"""KV cache: ``LongCtxCache`` (preallocated layers, logical vs stored length) and eviction policies."""

from .cache import LongCtxCache
from .layers import LongCtxLayer
from .policies import EvictionPolicy, make_policies

__all__ = ["EvictionPolicy", "LongCtxCache", "LongCtxLayer", "make_policies"]
