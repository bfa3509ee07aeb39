"""``LongCtxCache``: a transformers ``Cache`` whose full-attention layers are ``LongCtxLayer``s.

    cache = LongCtxCache(model, kv="snapkv:2048")        # or kv=None: no eviction
    model.generate(**inputs, past_key_values=cache)

The layer layout comes from transformers itself (``DynamicCache(config=...)``): every plain
full-attention layer becomes a ``LongCtxLayer`` (preallocated, optionally evicting); sliding-window,
chunked, linear-attention and other special layers keep transformers' own classes and behaviour.
Eviction needs the model to run the ``longctx_kv`` attention function, which reports each forward's
queries and padding to the layers (``hf_longctx.attention.kv``); ``lc.patch(model, kv=...)`` sets it.
``KVEviction.prefill_chunk`` reaches generate through the patch (``hf_longctx.cache.generate``); on a
model that is not patched, pass ``prefill_chunk_size=`` to ``generate`` yourself.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..attention.kv import KV_ATTENTION_NAME
from ..config import KVEviction, SinkAttention, kv_for_attention, parse_feature
from .layers import LongCtxLayer
from .policies import make_policies


class LongCtxCache(Cache):
    """A preallocated KV cache with optional eviction, for any model transformers builds a
    ``DynamicCache`` for.

    Args:
        model: the model (or its config) the cache serves.
        kv: the eviction: a ``KVEviction``, its dict or shorthand (``"snapkv:2048"``), or None to keep
            every token (then tokens are the same as with ``DynamicCache``). Checked against the model's
            sink attention, which sets a ``streaming`` budget left unset (``config.kv_for_attention``).
        capacity: fixed capacity in tokens of each full-attention layer, allocated at the first update;
            None grows the buffers geometrically.
        reserve: tokens to allocate at the first update of a layer that does not evict (generate
            passes its maximum length, so the buffers are allocated once); None: the first update's.
        cuda_graphs: decode through ``hf_longctx.cache.graphs`` (``custom_generate=lc.graph_generate``, or
            ``lc.patch(model, ..., cuda_graphs=True)``): one-token steps on static buffers, replayed as a CUDA
            graph on CUDA; on CPU the same steps run eagerly (graphs are CUDA-only; a documented no-op).
            Sliding-window layers then become ``LongCtxLayer``s too (they keep their tokens; the attention
            applies the window), as a graph needs every layer's buffers at fixed addresses.
    Raises:
        ValueError: eviction on a model whose attention implementation is not ``longctx_kv``; ``cuda_graphs``
            on a model with layers other than full or sliding-window attention (linear attention, chunked).
    """

    def __init__(
        self,
        model: PreTrainedModel | PretrainedConfig,
        kv: KVEviction | dict | str | None = None,
        *,
        capacity: int | None = None,
        reserve: int | None = None,
        cuda_graphs: bool = False,
    ):
        config = model.config if isinstance(model, PreTrainedModel) else model
        text_config = config.get_text_config(decoder=True)
        self.kv: KVEviction | None = parse_feature("kv", kv)
        if self.kv is not None:
            attention = parse_feature("attention", (getattr(config, "longctx", None) or {}).get("attention"))
            self.kv = kv_for_attention(self.kv, attention)
        if self.kv is not None and text_config._attn_implementation != KV_ATTENTION_NAME:
            raise ValueError(
                f"LongCtxCache: kv eviction needs the model's attention implementation to be {KV_ATTENTION_NAME!r} "
                f"(it reports queries and padding to the cache), got {text_config._attn_implementation!r}; "
                f"use lc.patch(model, kv=...) or model.set_attn_implementation({KV_ATTENTION_NAME!r})"
            )
        stock = DynamicCache(config=text_config).layers
        if not stock:
            raise ValueError(
                f"LongCtxCache: cannot tell the layer types of model_type {text_config.model_type!r} from its config"
            )
        full = [index for index, layer in enumerate(stock) if type(layer) is DynamicLayer]
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            other = {type(layer).__name__ for layer in stock if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)}
            if other:
                raise ValueError(f"LongCtxCache: cuda_graphs supports full and sliding-window attention layers; "
                                 f"model_type {text_config.model_type!r} has {sorted(other)}")
        windowed = [i for i, layer in enumerate(stock) if type(layer) is DynamicSlidingWindowLayer and self.cuda_graphs]
        policies = make_policies(self.kv, len(full)) if self.kv is not None else [None] * len(full)
        layers: list[Any] = list(stock)
        for index, policy in zip(full, policies):
            layers[index] = LongCtxLayer(policy, capacity=capacity, reserve=reserve, layer_idx=index)
        for index in windowed:
            layers[index] = LongCtxLayer(None, capacity=capacity, reserve=reserve, layer_idx=index)
        super().__init__(layers=layers)
        shared: dict = {}
        ours = [layer for layer in layers if isinstance(layer, LongCtxLayer)]
        for layer in ours:
            layer.shared = shared
        if ours:
            ours[0].clears_shared = True

    def set_view(self, view: SinkAttention | None) -> None:
        """Self-speculation: the full-attention layers attend through ``view`` (sinks + window over their stored
        slots) until ``set_view(None)``; see ``LongCtxLayer.set_view``."""
        for layer in self.layers:
            if isinstance(layer, LongCtxLayer):
                layer.set_view(view)

    def mark_holes(self, holes: torch.Tensor, start: int) -> None:
        """Per-row speculative acceptance: (B, k) bool ``holes`` mark logical tokens ``start ..`` that are not
        real (rejected drafts left between accepted tokens); see ``LongCtxLayer.mark_holes``."""
        for layer in self.layers:
            if isinstance(layer, LongCtxLayer):
                layer.mark_holes(holes, start)

    @property
    def stored_lengths(self) -> list[int]:
        """Tokens stored by each full-attention layer (the logical length is ``get_seq_length()``)."""
        return [layer.stored_length for layer in self.layers if isinstance(layer, LongCtxLayer)]
