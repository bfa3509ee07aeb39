"""RoPE in float32 for bf16/fp16 models (the "BFloat16 breaks RoPE" finding), per model instance.

Stock rotary embeddings compute cos/sin in float32 and then cast them to the activation dtype, so the
rotation runs on bf16 cos/sin: 8 bits of mantissa, far positions blur. With this on:
- the model's rotary modules return float32 cos/sin (their ``forward`` is given a float32 stand-in for
  the activations, which they read only for its device and dtype);
- the family's ``apply_rotary_pos_emb`` is wrapped: when cos is float32 and q is not, it rotates q and k
  in float32 and casts the results back to their dtype. Models that are not enabled pass bf16 cos/sin
  and are computed exactly as before.
The wrapper is installed in the family's modeling module while at least one model of that family has
fp32 RoPE enabled, and the original function is put back when the last one is disabled.
"""

from __future__ import annotations

import functools
import sys
import types

import torch

# modeling module name -> [the original apply_rotary_pos_emb, number of enabled rotary modules]
_installed: dict[str, list] = {}


def _fp32_apply(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if cos.dtype == torch.float32 and q.dtype != torch.float32:
            q_out, k_out = original(q.float(), k.float(), cos, sin, *args, **kwargs)
            return q_out.to(q.dtype), k_out.to(k.dtype)
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _fp32_forward(module: torch.nn.Module):
    class_forward = type(module).forward

    def forward(x: torch.Tensor, *args, **kwargs):
        return class_forward(module, x.new_empty(0, dtype=torch.float32), *args, **kwargs)

    return forward


def modeling_module(rotary: torch.nn.Module) -> types.ModuleType:
    """The modeling module of a rotary embedding; ValueError if it has no ``apply_rotary_pos_emb``."""
    module = sys.modules[type(rotary).__module__]
    if not callable(getattr(module, "apply_rotary_pos_emb", None)):
        raise ValueError(
            f"RopeScaling: `fp32` is not supported for {type(rotary).__name__}: its module {module.__name__} has "
            "no apply_rotary_pos_emb; supported: models whose modeling module rotates q and k with it (Llama, "
            "Mistral, Qwen2/3, Gemma 2/3, Phi-3)"
        )
    return module


def enable(rotary: torch.nn.Module) -> None:
    """Make ``rotary`` hand out float32 cos/sin and its family rotate in float32. Undo with ``disable``."""
    module = modeling_module(rotary)
    entry = _installed.get(module.__name__)
    if entry is None:
        entry = _installed[module.__name__] = [module.apply_rotary_pos_emb, 0]
        module.apply_rotary_pos_emb = _fp32_apply(entry[0])
    entry[1] += 1
    rotary.forward = _fp32_forward(rotary)


def disable(rotary: torch.nn.Module) -> None:
    """Undo ``enable(rotary)``: the instance ``forward`` goes, and the last one out restores the function."""
    rotary.__dict__.pop("forward", None)
    module = sys.modules[type(rotary).__module__]
    entry = _installed[module.__name__]
    entry[1] -= 1
    if entry[1] == 0:
        module.apply_rotary_pos_emb = entry[0]
        del _installed[module.__name__]
