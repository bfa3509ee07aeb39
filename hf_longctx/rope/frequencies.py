"""Inverse frequencies of hf-longctx's own rope types, as transformers' ``ROPE_INIT_FUNCTIONS`` expects them.

Every function has the registry's signature ``fn(config, device=None, seq_len=None, layer_type=None)`` and
returns ``(inv_freq, attention_factor)``: ``inv_freq`` is (d / 2,) float32 in radians per token (d = the
rotary dimension, ``head_dim * partial_rotary_factor``), ``attention_factor`` multiplies cos and sin (so the
attention logits by its square). They read ``config.rope_parameters`` (``[layer_type]`` when nested), which
``rope.registry.rope_parameters_for`` writes and the ``_validate_longctx_*`` validators check; the keys are
the ``RopeScaling`` field names, ``rope_theta`` is the model's own base.

Notation: theta_i = rope_theta ** (-2i / d), i = 0 .. d/2 - 1; L = ``original_max_position_embeddings``.
"""

from __future__ import annotations

import math

import torch


def rope_parameters_of(config, layer_type: str | None = None) -> dict:
    """The rope parameters a rotary embedding of ``layer_type`` (None: the only one) is built from."""
    parameters = config.rope_parameters
    return parameters[layer_type] if layer_type is not None else parameters


def rotary_dim(config, parameters: dict) -> int:
    """d: the number of rotated channels of a head (``head_dim * partial_rotary_factor``)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * parameters.get("partial_rotary_factor", 1.0))


def default_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    """theta_i = base ** (-2i / dim), (dim / 2,) float32: bit for bit what the models compute."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponents)


def _setup(config, device, layer_type) -> tuple[dict, int, torch.Tensor]:
    parameters = rope_parameters_of(config, layer_type)
    dim = rotary_dim(config, parameters)
    return parameters, dim, default_inv_freq(parameters["rope_theta"], dim, device)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature: 0.1 ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def interpolate_by_parts(
    inv_freq: torch.Tensor, factor: float, trained_length: int, base: float, beta_fast: float, beta_slow: float
) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies: theta_i where L spans more than ``beta_fast`` turns of it,
    theta_i / factor where it spans fewer than ``beta_slow``, linear in i in between.

    The ramp edges are the (floor, ceil) pair indices whose wavelength fits ``beta`` times in L, clamped to
    [0, d - 1] as in the YaRN reference code. inv_freq: (d / 2,) float32; returns the same shape.
    """
    dim = 2 * inv_freq.shape[0]

    def pair_index(turns: float) -> float:
        return dim * math.log(trained_length / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim - 1)
    width = max(high - low, 1e-3)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / width).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def compute_ntk(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling: base' = rope_theta * factor ** (d / (d - 2)); attention factor 1."""
    parameters = rope_parameters_of(config, layer_type)
    dim = rotary_dim(config, parameters)
    base = parameters["rope_theta"] * parameters["factor"] ** (dim / (dim - 2))
    return default_inv_freq(base, dim, device), 1.0


def compute_abf(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """Adjusted base frequency: base' = ``base``; attention factor 1."""
    parameters = rope_parameters_of(config, layer_type)
    return default_inv_freq(parameters["base"], rotary_dim(config, parameters), device), 1.0


def compute_ntk_by_parts(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """YaRN's interpolation (``interpolate_by_parts``) at ``factor``, without its temperature (factor 1)."""
    parameters, _, inv_freq = _setup(config, device, layer_type)
    return _by_parts(inv_freq, parameters, parameters["factor"]), 1.0


def compute_dynamic_yarn(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """YaRN at s = min(factor, max(1, seq_len / L)): ``interpolate_by_parts`` and temperature 0.1 ln s + 1.

    ``seq_len`` (int or 0-d tensor; None at initialisation, meaning s = 1) is the current length, which
    transformers' ``dynamic_rope_update`` passes because the type name contains "dynamic".
    """
    parameters, _, inv_freq = _setup(config, device, layer_type)
    length = 0.0 if seq_len is None else float(seq_len)
    scale = min(parameters["factor"], max(1.0, length / parameters["original_max_position_embeddings"]))
    if scale == 1.0:
        return inv_freq, 1.0
    return _by_parts(inv_freq, parameters, scale), yarn_attention_factor(scale)


def _by_parts(inv_freq: torch.Tensor, parameters: dict, factor: float) -> torch.Tensor:
    return interpolate_by_parts(
        inv_freq,
        factor,
        parameters["original_max_position_embeddings"],
        parameters["rope_theta"],
        parameters.get("beta_fast") or 32,
        parameters.get("beta_slow") or 1,
    )


def compute_giraffe_power(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """Giraffe power scaling: theta_i' = theta_i * (1 - 2i / d) ** power; attention factor 1."""
    parameters, dim, inv_freq = _setup(config, device, layer_type)
    shrink = 1 - torch.arange(0, dim, 2, dtype=torch.float32, device=inv_freq.device) / dim
    return inv_freq * shrink ** parameters["power"], 1.0


def compute_giraffe_truncate(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """Giraffe truncated basis with b = 2 pi / L and a = rho = 2 pi / (factor * L):
    theta_i' = theta_i if theta_i >= b, rho if a < theta_i < b, 0 if theta_i <= a; attention factor 1.

    Components whose wavelength fits in the trained length keep it; the next ones become one slow clock of
    period ``factor * L``; the slowest carry no position at all.
    """
    parameters, _, inv_freq = _setup(config, device, layer_type)
    trained = parameters["original_max_position_embeddings"]
    high = 2 * math.pi / trained
    low = high / parameters["factor"]
    middle = torch.where(inv_freq > low, torch.full_like(inv_freq, low), torch.zeros_like(inv_freq))
    return torch.where(inv_freq >= high, inv_freq, middle), 1.0


# Shorthand type -> init function; registered in ROPE_INIT_FUNCTIONS as "longctx_<type>".
LONGCTX_ROPE_FUNCTIONS = {
    "ntk": compute_ntk,
    "abf": compute_abf,
    "dynamic_yarn": compute_dynamic_yarn,
    "giraffe_power": compute_giraffe_power,
    "giraffe_truncate": compute_giraffe_truncate,
    "ntk_by_parts": compute_ntk_by_parts,
}
