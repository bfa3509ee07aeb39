"""How ``model.generate`` picks up a ``LongCtxCache`` on a model patched with ``kv=...``.

``lc.patch(model, kv=...)`` binds :func:`prepare_cache_for_generation` on the model instance, over
``GenerationMixin._prepare_cache_for_generation`` (same signature in transformers 5.17 and 5.23), and
``lc.unpatch`` removes it. When generate would build its default ``DynamicCache`` (no cache passed,
``use_cache`` on, no ``cache_implementation``), it builds ``LongCtxCache(model, kv=...)`` instead;
otherwise transformers' own preparation runs. ``KVEviction.prefill_chunk`` (of a ``LongCtxCache``
passed in, else of the patch) becomes generate's ``prefill_chunk_size`` unless the call sets one.
"""

from __future__ import annotations

from typing import Any

from ..config import parse_feature
from .cache import LongCtxCache


def prepare_cache_for_generation(
    self: Any, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int, max_cache_length: int
) -> None:
    """Instance override of ``GenerationMixin._prepare_cache_for_generation`` (bound by ``patch``)."""
    cache = model_kwargs.get("past_key_values")
    kv = parse_feature("kv", (getattr(self.config, "longctx", None) or {}).get("kv"))
    if isinstance(cache, LongCtxCache):
        kv = cache.kv
    if kv is not None and kv.prefill_chunk is not None and generation_config.prefill_chunk_size is None:
        generation_config.prefill_chunk_size = kv.prefill_chunk
    builds_default = (
        cache is None
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
        and self._supports_default_dynamic_cache()
    )
    if not builds_default:
        type(self)._prepare_cache_for_generation(
            self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        return
    cache = LongCtxCache(self, kv=kv, reserve=max_cache_length)
    if generation_config.is_assistant:
        cache.activate_past_recording()
    model_kwargs["past_key_values"] = cache
