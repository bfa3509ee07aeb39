"""hf-longctx's rope types in transformers' own registry, and the ``rope_parameters`` a ``RopeScaling`` writes.

Registration (``register()``, run by ``import hf_longctx``) adds, for every type of
``frequencies.LONGCTX_ROPE_FUNCTIONS``, ``ROPE_INIT_FUNCTIONS["longctx_<type>"]`` and a
``_validate_longctx_<type>_rope_parameters`` method on ``RotaryEmbeddingConfigMixin`` (the method
``PreTrainedConfig.validate_rope`` looks up; without it transformers only warns). So a config.json whose
``rope_parameters`` name a ``longctx_*`` type loads with plain ``from_pretrained`` after ``import hf_longctx``,
and a bad value raises ``ValueError`` naming the parameter.
"""

from __future__ import annotations

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

from ..config import ROPE_TYPES, RopeScaling
from .frequencies import LONGCTX_ROPE_FUNCTIONS, rotary_dim

PREFIX = "longctx_"
_MODEL_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor")  # the model's own, kept as they are
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's values


def rope_type_name(scaling_type: str) -> str:
    """The ``rope_type`` a RopeScaling type is registered under: ``longctx_<type>`` or transformers' own name."""
    return PREFIX + scaling_type if scaling_type in LONGCTX_ROPE_FUNCTIONS else scaling_type


def rope_parameters_for(feature: RopeScaling, config, current: dict) -> dict:
    """The rope parameters that carry out ``feature`` on a model whose parameters are ``current``.

    ``rope_theta`` and ``partial_rotary_factor`` are the model's; ``original_max_position_embeddings``
    defaults to ``config.max_position_embeddings`` for the types that take it. ``max_position_embeddings``
    itself is left alone: it stays the trained length. For the types that change the rotary embedding
    (not ``default``, not those on the attention path).
    """
    required, optional = ROPE_TYPES[feature.type]
    parameters = {key: current[key] for key in _MODEL_KEYS if key in current}
    parameters["rope_type"] = rope_type_name(feature.type)
    if "original_max_position_embeddings" in optional:
        parameters["original_max_position_embeddings"] = config.max_position_embeddings
    if feature.type == "llama3":
        parameters.update(_LLAMA3_DEFAULTS)
    for name in (*required, *optional):
        value = getattr(feature, name)
        if value is not None:
            parameters[name] = list(value) if isinstance(value, tuple) else value
    if feature.type == "longrope":
        pairs = rotary_dim(config, parameters) // 2
        if len(feature.short_factor) != pairs:
            raise ValueError(
                f"RopeScaling(type='longrope'): `short_factor` and `long_factor` need {pairs} values (rotary "
                f"dimension / 2) for this model, got {len(feature.short_factor)}"
            )
    return parameters


def _validator(scaling_type: str):
    required, optional = ROPE_TYPES[scaling_type]
    accepted = (*_MODEL_KEYS, *required, *optional)

    def validate(config, rope_parameters: dict, ignore_keys: set[str] | None = None) -> None:
        keys = set(rope_parameters) - set(ignore_keys or ())
        name = rope_parameters["rope_type"]
        unknown = sorted(keys - set(accepted))
        if unknown:
            raise ValueError(
                f"rope_parameters of rope_type {name!r}: unknown key(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted)}"
            )
        if "original_max_position_embeddings" in optional and "original_max_position_embeddings" not in keys:
            raise ValueError(
                f"rope_parameters of rope_type {name!r}: missing `original_max_position_embeddings` (the length "
                "the model was trained at)"
            )
        RopeScaling(type=scaling_type, **{key: rope_parameters[key] for key in keys - set(_MODEL_KEYS)})

    validate.__name__ = f"_validate_{PREFIX}{scaling_type}_rope_parameters"
    validate.__doc__ = f"Check the rope_parameters of ``{PREFIX}{scaling_type}`` (ValueError naming the key)."
    return validate


def register() -> None:
    """Add the ``longctx_*`` rope types to ``ROPE_INIT_FUNCTIONS`` with their validators (idempotent)."""
    for scaling_type, function in LONGCTX_ROPE_FUNCTIONS.items():
        ROPE_INIT_FUNCTIONS[PREFIX + scaling_type] = function
        validator = _validator(scaling_type)
        setattr(RotaryEmbeddingConfigMixin, validator.__name__, validator)
