"""``patch`` / ``unpatch``: apply a LongCtxConfig to a loaded model through transformers' extension
points, and undo exactly that.

What ``patch`` changes, and ``unpatch`` restores:
- the attention implementation of the model's configs (``set_attn_implementation``), for the
  attention feature (``longctx_sink``; ``longctx_s2`` for shifted sparse attention) and the kv feature
  (``longctx_kv``, which also applies a configured sink/window rule);
- for the kv feature, ``_prepare_cache_for_generation`` bound on the model instance, so that
  ``generate`` builds a ``LongCtxCache`` (``hf_longctx.cache.generate``);
- for the speculative feature, ``generate`` bound on the model instance, so that it runs
  ``speculative_generate`` as its ``custom_generate`` loop (a draft given by name is loaded here);
- for the rope feature, the rotary embeddings (``inv_freq``, ``original_inv_freq``, attention scaling) and
  the configs' ``rope_parameters`` (``hf_longctx.rope.apply``); Self-Extend and dual-chunk instead set the
  ``longctx_rope_remap`` attention implementation;
- ``model.config.longctx``: the config as a plain dict, so ``save_pretrained`` keeps it;
- one private attribute on the model holding what to restore.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from .attention import (ATTENTION_NAME, KV_ATTENTION_NAME, REMAP_ATTENTION_NAME, S2_ATTENTION_NAME,
                        SOFTPLUS_ATTENTION_NAME, SPARSE_ATTENTION_NAME)
from .cache.generate import prepare_cache_for_generation
from .config import LongCtxConfig, ShiftedSparseAttention, SinkAttention, SoftplusAttention, SparseAttention
from .rope.apply import RopeState, apply_rope_scaling, restore_rope_scaling
from .speculative import bind_generate, load_draft

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
_STATE_ATTR = "_longctx_patch_state"
_MISSING = object()


class UnsupportedModelError(ValueError):
    """The model cannot take hf-longctx features (names its model_type and the supported families)."""


@dataclass
class _PatchState:
    config: LongCtxConfig
    # (config object, its `_attn_implementation_internal` before patching, or _MISSING)
    attn_implementations: list[tuple[Any, Any]] = field(default_factory=list)
    previous_longctx: Any = _MISSING
    rope: RopeState | None = None  # what the rope feature changed
    # the model instance's own `_prepare_cache_for_generation` before patching, or _MISSING
    prepare_cache: Any = _MISSING
    # the model instance's own `generate` before patching, or _MISSING
    generate: Any = _MISSING


def _model_configs(model: PreTrainedModel) -> list[Any]:
    """Every config object of the model: the top one, sub-configs, and submodels' configs."""
    found: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                pending.append(sub)
    return list(found.values())


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT ``PeftModel`` (``get_base_model()``), else ``model`` itself: patching a
    wrapped model patches the model it wraps, so adapters and ``modules_to_save`` train on the patched attention."""
    if isinstance(model, PreTrainedModel) or not callable(getattr(model, "get_base_model", None)):
        return model
    return model.get_base_model()


def check_supported(model: Any) -> None:
    """Raise UnsupportedModelError unless the model is a decoder-only LM with rotary positions whose
    attention goes through transformers' attention registry."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if not isinstance(model, PreTrainedModel):
        reason = f"{type(model).__name__} is not a transformers PreTrainedModel"
    elif getattr(config, "is_encoder_decoder", False):
        reason = "it is an encoder-decoder model"
    elif not any(getattr(m, "is_causal", False) for m in model.modules() if hasattr(m, "num_key_value_groups")):
        reason = "it has no causal self-attention (encoder-only or not a decoder LM)"
    elif not any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        reason = "it has no rotary position embedding"
    elif not type(model)._can_set_attn_implementation():
        reason = "its attention is not routed through transformers' AttentionInterface"
    else:
        return
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: {reason}. Supported families: "
        f"{', '.join(SUPPORTED_FAMILIES)}, and other decoder-only models with rotary embeddings whose "
        "attention goes through transformers' AttentionInterface."
    )


def patch(model: PreTrainedModel, config: LongCtxConfig | dict | None = None, **features: Any) -> PreTrainedModel:
    """Apply long-context features to a loaded model, in place; returns the model.

    Args:
        model: a transformers causal LM (already loaded; any device and dtype), or a PEFT model wrapping one.
        config: a LongCtxConfig, its dict form, or None.
        **features: ``attention=``, ``rope=``, ``kv=``, ``speculative=``, each a feature dataclass,
            a dict or a shorthand string (``attention="sink:4096"``); they override ``config``.
    Patching again with the same config does nothing; with another config replaces the first.
    """
    wanted = LongCtxConfig.coerce(config, **features)
    if wanted.is_empty():
        raise ValueError("patch() needs at least one feature: attention=, rope=, kv= or speculative=")
    wrapper, model = model, base_model(model)
    check_supported(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and state.config == wanted:
        return wrapper
    speculative = None if wanted.speculative is None else load_draft(wanted.speculative, model)  # may raise
    if state is not None:
        unpatch(model)

    state = _PatchState(config=wanted, previous_longctx=model.config.__dict__.get("longctx", _MISSING))
    state.attn_implementations = [
        (c, c.__dict__.get("_attn_implementation_internal", _MISSING)) for c in _model_configs(model)
    ]
    if wanted.rope is not None:
        state.rope = apply_rope_scaling(model, wanted.rope)  # on failure it has restored what it changed
    setattr(model, _STATE_ATTR, state)
    if isinstance(wanted.attention, SinkAttention):
        model.set_attn_implementation(ATTENTION_NAME)
    if isinstance(wanted.attention, ShiftedSparseAttention):
        model.set_attn_implementation(S2_ATTENTION_NAME)
    if isinstance(wanted.attention, SoftplusAttention):
        model.set_attn_implementation(SOFTPLUS_ATTENTION_NAME)
    if isinstance(wanted.attention, SparseAttention):
        model.set_attn_implementation(SPARSE_ATTENTION_NAME)
    if wanted.rope is not None and wanted.rope.on_attention_path:
        model.set_attn_implementation(REMAP_ATTENTION_NAME)
    if wanted.kv is not None:
        model.set_attn_implementation(KV_ATTENTION_NAME)
        state.prepare_cache = model.__dict__.get("_prepare_cache_for_generation", _MISSING)
        model._prepare_cache_for_generation = types.MethodType(prepare_cache_for_generation, model)
    if speculative is not None:
        state.generate = model.__dict__.get("generate", _MISSING)
        model.generate = bind_generate(model, speculative)
    model.config.longctx = wanted.to_dict()
    return wrapper


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Restore exactly what ``patch`` changed; a model that is not patched is returned unchanged."""
    wrapper, model = model, base_model(model)
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return wrapper
    for config, value in state.attn_implementations:
        if value is _MISSING:
            config.__dict__.pop("_attn_implementation_internal", None)
        else:
            config._attn_implementation_internal = value
    if state.config.kv is not None:
        if state.prepare_cache is _MISSING:
            model.__dict__.pop("_prepare_cache_for_generation", None)
        else:
            model._prepare_cache_for_generation = state.prepare_cache
    if state.config.speculative is not None:
        if state.generate is _MISSING:
            model.__dict__.pop("generate", None)
        else:
            model.generate = state.generate
    if state.rope is not None:
        restore_rope_scaling(state.rope)
    if state.previous_longctx is _MISSING:
        model.config.__dict__.pop("longctx", None)
    else:
        model.config.longctx = state.previous_longctx
    delattr(model, _STATE_ATTR)
    return wrapper


def patched_config(model: PreTrainedModel) -> LongCtxConfig | None:
    """The LongCtxConfig in effect on a model, or None if it is not patched."""
    state = base_model(model).__dict__.get(_STATE_ATTR)
    return None if state is None else state.config


def from_pretrained(path: str, **hf_kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)``, then re-apply the saved
    ``longctx`` key of its config.json (if any) with :func:`patch`."""
    model = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)
    saved = model.config.__dict__.pop("longctx", None)
    if saved:
        patch(model, LongCtxConfig.from_dict(saved))
    return model
