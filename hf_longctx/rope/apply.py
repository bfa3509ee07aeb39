"""Apply a ``RopeScaling`` to a loaded model's rotary embeddings, and restore them exactly.

``apply_rope_scaling`` writes the new ``rope_parameters`` into the configs the rotary modules read and
recomputes, in every rotary module, ``inv_freq``, ``original_inv_freq`` and the attention scaling with
transformers' own ``ROPE_INIT_FUNCTIONS`` (where the ``longctx_*`` types are registered), exactly as the
module's ``__init__`` would from that config. ``restore_rope_scaling`` puts back the very tensors,
attributes and parameter dicts that were there before.

Persistence: the config also gets ``longctx_stock_rope_parameters`` (the parameters before scaling), so a
checkpoint saved while patched is rebuilt scaled by a plain ``from_pretrained``, and patching it again (as
``hf_longctx.from_pretrained`` does) starts from the stock embedding, so that ``unpatch`` returns to it.

Models whose rope parameters are nested by layer type (Gemma 3) are scaled on their ``full_attention``
layers; their local layers keep their own rope. Types on the attention path (Self-Extend, dual-chunk)
leave the rotary embedding as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..config import RopeScaling
from . import fp32
from .registry import rope_parameters_for

STOCK_KEY = "longctx_stock_rope_parameters"
SCALED_LAYER_TYPE = "full_attention"
# Rotary-module attributes the rope machinery sets (also with a "<layer_type>_" prefix).
_ROTARY_ATTRIBUTES = ("rope_type", "attention_scaling", "max_seq_len_cached", "long_inv_freq")
_MISSING = object()


@dataclass
class RopeState:
    """What ``apply_rope_scaling`` changed: enough to put every object back as it was."""

    # (config, its rope_parameters before, its STOCK_KEY before or _MISSING)
    configs: list[tuple[Any, Any, Any]] = field(default_factory=list)
    # (rotary module, its buffers before, its rope attributes before)
    rotaries: list[tuple[torch.nn.Module, dict, dict]] = field(default_factory=list)


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's rotary embedding modules (those with an ``inv_freq`` buffer, also per layer type)."""
    return [
        module
        for module in model.modules()
        if type(module).__name__.endswith("RotaryEmbedding")
        and any(name == "inv_freq" or name.endswith("_inv_freq") for name in module._buffers)
    ]


def _layer_types(rotary: torch.nn.Module) -> list[str | None]:
    """[None] for a rotary module with one embedding; the layer types to scale for a nested one."""
    if not isinstance(rotary.rope_type, dict):
        return [None]
    if SCALED_LAYER_TYPE not in rotary.rope_type:
        raise ValueError(
            f"RopeScaling: {type(rotary).__name__} has per-layer-type rope ({', '.join(rotary.rope_type)}) but "
            f"no {SCALED_LAYER_TYPE!r} layers to scale"
        )
    return [SCALED_LAYER_TYPE]


def _rebuild(rotary: torch.nn.Module) -> None:
    """Recompute the rotary module's frequencies from its config, as its ``__init__`` does."""
    for layer_type in _layer_types(rotary):
        prefix = "" if layer_type is None else f"{layer_type}_"
        parameters = rotary.config.rope_parameters
        rope_type = (parameters if layer_type is None else parameters[layer_type])["rope_type"]
        if rope_type == "default":
            function = rotary.compute_default_rope_parameters
        else:
            function = ROPE_INIT_FUNCTIONS[rope_type]
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = function(rotary.config, **kwargs)
        inv_freq = inv_freq.to(getattr(rotary, f"{prefix}inv_freq").device)
        rotary.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)
        rotary.register_buffer(f"{prefix}original_inv_freq", inv_freq.clone(), persistent=False)
        rotary.__dict__.pop(f"{prefix}long_inv_freq", None)
        if layer_type is None:
            rotary.rope_type = rope_type
            rotary.attention_scaling = scaling
            rotary.max_seq_len_cached = rotary.original_max_seq_len
        else:
            rotary.rope_type = {**rotary.rope_type, layer_type: rope_type}  # a new dict: the old one is saved
            setattr(rotary, f"{prefix}attention_scaling", scaling)
            rotary.__dict__.pop(f"{prefix}max_seq_len_cached", None)


def _rope_attributes(rotary: torch.nn.Module) -> dict:
    return {
        name: value
        for name, value in rotary.__dict__.items()
        if any(name == attr or name.endswith("_" + attr) for attr in _ROTARY_ATTRIBUTES)
    }


def _scaled_parameters(feature: RopeScaling, config, current: dict, nested: bool) -> dict:
    if not nested:
        return rope_parameters_for(feature, config, current)
    scaled = rope_parameters_for(feature, config, current[SCALED_LAYER_TYPE])
    return {**copy.deepcopy(current), SCALED_LAYER_TYPE: scaled}


def apply_rope_scaling(model: torch.nn.Module, feature: RopeScaling) -> RopeState:
    """Scale the rope of every rotary module of ``model`` (in place); returns what to restore."""
    rotaries = rotary_modules(model)
    configs = list({id(rotary.config): rotary.config for rotary in rotaries}.values())
    for config in configs:  # a checkpoint saved while scaled: back to its stock embedding first
        if STOCK_KEY in config.__dict__:
            config.rope_parameters = config.__dict__.pop(STOCK_KEY)
            for rotary in rotaries:
                if rotary.config is config:
                    _rebuild(rotary)

    state = RopeState()
    state.configs = [(c, copy.deepcopy(c.rope_parameters), c.__dict__.get(STOCK_KEY, _MISSING)) for c in configs]
    state.rotaries = [(r, dict(r._buffers), _rope_attributes(r)) for r in rotaries]
    try:
        if not feature.on_attention_path and feature.type != "default":
            nested = {id(r.config): _layer_types(r) != [None] for r in rotaries}
            for config in configs:
                current = config.rope_parameters
                config.rope_parameters = _scaled_parameters(feature, config, current, nested[id(config)])
                setattr(config, STOCK_KEY, copy.deepcopy(current))
                try:
                    config.validate_rope()
                except ValueError as error:  # some configs accept only their own rope types (Phi-3)
                    raise ValueError(
                        f"RopeScaling(type={feature.type!r}) cannot be applied to model_type "
                        f"{config.model_type!r}: {error}"
                    ) from error
            for rotary in rotaries:
                _rebuild(rotary)
        if feature.fp32:
            for rotary in rotaries:
                fp32.enable(rotary)
    except Exception:
        restore_rope_scaling(state)
        raise
    return state


def restore_rope_scaling(state: RopeState) -> None:
    """Put back the configs' rope parameters and the rotary modules' buffers and attributes."""
    for rotary, buffers, attributes in state.rotaries:
        if "forward" in rotary.__dict__:
            fp32.disable(rotary)
        for name, tensor in buffers.items():
            current = rotary._buffers.get(name)
            rotary._buffers[name] = tensor if current is None else tensor.to(current.device)
        for name in list(_rope_attributes(rotary)):
            if name not in attributes:
                del rotary.__dict__[name]
        rotary.__dict__.update(attributes)
    for config, parameters, stock in state.configs:
        config.rope_parameters = parameters
        if stock is _MISSING:
            config.__dict__.pop(STOCK_KEY, None)
        else:
            setattr(config, STOCK_KEY, stock)
