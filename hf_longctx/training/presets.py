"""Training presets: LongLoRA's PEFT configuration and QLoRA loading (NF4 4-bit + k-bit training preparation)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig

LONGLORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT matches `modules_to_save` as name suffixes: "norm" covers every *norm module (layer norms, the final
# norm, Qwen3's q_norm / k_norm).
LONGLORA_TRAINABLE = ("embed_tokens", "norm")


def longlora_peft_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = LONGLORA_TARGETS,
    trainable_modules: Sequence[str] = LONGLORA_TRAINABLE,
    **lora_kwargs: Any,
) -> LoraConfig:
    """LongLoRA's recipe as a ``peft.LoraConfig``: LoRA on the attention projections (q, k, v, o) plus fully
    trainable embeddings and normalisation layers (``modules_to_save``), which LongLoRA found necessary for
    context extension.

    Args:
        r: LoRA rank; >= 1.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / r); > 0.
        lora_dropout: dropout on the LoRA input, in [0, 1).
        target_modules: module-name suffixes that get LoRA adapters.
        trainable_modules: module-name suffixes trained in full and saved with the adapter.
        **lora_kwargs: other ``LoraConfig`` fields.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"longlora_peft_config: `r` must be an integer >= 1, got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"longlora_peft_config: `lora_alpha` must be > 0, got {lora_alpha!r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"longlora_peft_config: `lora_dropout` must be in [0, 1), got {lora_dropout!r}")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=list(trainable_modules),
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing of every decoder layer of ``model``: transformers'
    ``activation_checkpointing_enable`` where it exists (newer 5.x, which deprecates the old name), else
    ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def qlora(
    model_name_or_path: str,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    **from_pretrained_kwargs: Any,
):
    """Load a causal LM for QLoRA: NF4 4-bit weights with double quantisation, computing in ``compute_dtype``,
    prepared by ``peft.prepare_model_for_kbit_training`` (norms in float32, input gradients enabled,
    non-reentrant gradient checkpointing if asked). Wrap it with ``peft.get_peft_model(model,
    longlora_peft_config())`` next.

    Raises:
        ImportError: bitsandbytes is not installed (``pip install 'hf-longctx[qlora]'``).
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "qlora() needs bitsandbytes for 4-bit NF4 weights; install the extra: pip install 'hf-longctx[qlora]'"
        )
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, quantization_config=quantization, dtype=compute_dtype, **from_pretrained_kwargs
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
