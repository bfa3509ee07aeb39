"""RoPE scaling: rope types registered into transformers' ``ROPE_INIT_FUNCTIONS``, applied to loaded models.

- ``frequencies``: the inverse frequencies of the ``longctx_*`` types (registry signature);
- ``registry``: registration with validators, and the ``rope_parameters`` a ``RopeScaling`` writes;
- ``apply``: scaling a loaded model's rotary embeddings and restoring them exactly (used by ``patch``);
- ``fp32``: rotating queries and keys in float32 for bf16/fp16 models;
- ``augment``: E2-LLM's random scale and position offset per training sample.

Self-Extend and dual-chunk attention are position schemes of the attention path
(``hf_longctx.attention.remap``); they leave the rotary embedding unchanged.
"""

from .augment import E2LLMAugmentation
from .registry import PREFIX, register, rope_parameters_for, rope_type_name

__all__ = ["E2LLMAugmentation", "PREFIX", "register", "rope_parameters_for", "rope_type_name"]
