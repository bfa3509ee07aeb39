"""RoPE scaling (issue 6) on the CPU: formulas, registry round trips, errors, exact unpatch, fp32 RoPE,
Self-Extend / dual-chunk on the attention path (PyTorch reference) and the E2-LLM augmentation."""

import contextlib
import logging
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from tiny_models import FAMILIES, random_ids, tiny_model
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, _compute_yarn_parameters
from transformers.models.llama import modeling_llama

import hf_longctx as lc
from hf_longctx.config import parse_feature
from hf_longctx.kernels.reference import sink_window_attention
from hf_longctx.kernels.reference_remap import RemapScheme, remap_attention, rerotate
from hf_longctx.rope import E2LLMAugmentation
from hf_longctx.rope.apply import STOCK_KEY, rotary_modules
from hf_longctx.rope.frequencies import LONGCTX_ROPE_FUNCTIONS

TRAINED = 256  # tiny models' max_position_embeddings
DIM = 16  # tiny llama's head_dim (fully rotary)
BASE = 10000.0
THETA = 1.0 / BASE ** (torch.arange(0, DIM, 2).float() / DIM)
I = torch.arange(DIM // 2).float()

SCALING_SPECS = [
    "linear:4", "dynamic:4", "yarn:4", "llama3:8", "ntk:4", "abf:500000", "dynamic_yarn:8",
    "giraffe_power:2", "giraffe_truncate:4", "ntk_by_parts:4",
]
LONGROPE = lc.RopeScaling(type="longrope", short_factor=[1.0] * 8, long_factor=[float(i + 1) for i in range(8)])
REMAP_SPECS = ["self_extend:window=12,group=4", "dual_chunk:chunk_size=20,local_size=6"]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def rotary(model):
    (module,) = rotary_modules(model)
    return module


@contextlib.contextmanager
def transformers_warnings():
    """Collect the warnings transformers logs (its loggers do not propagate to the root logger)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def by_parts(theta, factor, beta_fast=32, beta_slow=1):
    """YaRN's ramp written out: index bounds from the number of turns over the trained length."""
    def index(turns):
        return DIM * math.log(TRAINED / (turns * 2 * math.pi)) / (2 * math.log(BASE))
    low, high = max(math.floor(index(beta_fast)), 0), min(math.ceil(index(beta_slow)), DIM - 1)
    ramp = ((I - low) / (high - low)).clamp(0, 1)
    return theta * (1 - ramp) + theta / factor * ramp


# ---- formulas ---------------------------------------------------------------------------------------

def expected_rope(spec):
    """(inv_freq, attention factor) of the types, from their formulas (at initialisation)."""
    s = 4.0
    wavelength = 2 * math.pi / THETA
    llama3 = torch.where(wavelength > TRAINED, THETA / 8, THETA)
    smooth = (TRAINED / wavelength - 1) / (4 - 1)
    medium = (wavelength >= TRAINED / 4) & (wavelength <= TRAINED)
    llama3 = torch.where(medium, (1 - smooth) * llama3 / 8 + smooth * llama3, llama3)
    high, low = 2 * math.pi / TRAINED, 2 * math.pi / (s * TRAINED)
    return {
        "linear:4": (THETA / s, 1.0),
        "dynamic:4": (THETA, 1.0),  # recomputed only past the trained length
        "yarn:4": (by_parts(THETA, s), 0.1 * math.log(s) + 1),
        "llama3:8": (llama3, 1.0),
        "ntk:4": (1.0 / (BASE * s ** (DIM / (DIM - 2))) ** (2 * I / DIM), 1.0),
        "abf:500000": (1.0 / 500000.0 ** (2 * I / DIM), 1.0),
        "dynamic_yarn:8": (THETA, 1.0),  # s = 1 at the trained length
        "giraffe_power:2": (THETA * (1 - 2 * I / DIM) ** 2, 1.0),
        "giraffe_truncate:4": (torch.where(THETA >= high, THETA, torch.where(THETA > low, low, 0.0)), 1.0),
        "ntk_by_parts:4": (by_parts(THETA, s), 1.0),
    }[spec]


@pytest.mark.parametrize("spec", SCALING_SPECS)
def test_inv_freq_and_attention_factor_follow_the_formula(spec):
    model = lc.patch(tiny_model("llama"), rope=spec)
    module = rotary(model)
    inv_freq, factor = expected_rope(spec)
    torch.testing.assert_close(module.inv_freq, inv_freq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(module.original_inv_freq, inv_freq, rtol=1e-5, atol=1e-9)
    assert module.attention_scaling == pytest.approx(factor)
    assert module.rope_type == lc.rope.rope_type_name(spec.partition(":")[0])


def test_longrope_formula():
    model = lc.patch(tiny_model("llama"), rope=LONGROPE)
    module = rotary(model)
    torch.testing.assert_close(module.inv_freq, THETA)  # short factors (all 1) at initialisation
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, seq_len=TRAINED + 1)
    torch.testing.assert_close(long, THETA / torch.arange(1, 9).float())
    # factor defaults to max_position_embeddings / original_max_position_embeddings = 1: no temperature
    assert module.attention_scaling == 1.0


def test_ntk_by_parts_is_yarn_without_temperature():
    model = lc.patch(tiny_model("llama"), rope="yarn:4")
    yarn_inv_freq, yarn_factor = _compute_yarn_parameters(model.config)
    lc.patch(model, rope="ntk_by_parts:4")
    torch.testing.assert_close(rotary(model).inv_freq, yarn_inv_freq)
    assert yarn_factor > 1 and rotary(model).attention_scaling == 1.0


def test_dynamic_yarn_recomputes_its_factor_from_the_length():
    model = lc.patch(tiny_model("llama"), rope="dynamic_yarn:8")
    function = ROPE_INIT_FUNCTIONS["longctx_dynamic_yarn"]
    for length, s in ((TRAINED, 1.0), (3 * TRAINED, 3.0), (100 * TRAINED, 8.0)):
        inv_freq, factor = function(model.config, seq_len=torch.tensor(length))
        torch.testing.assert_close(inv_freq, by_parts(THETA, s) if s > 1 else THETA)
        assert factor == pytest.approx(0.1 * math.log(s) + 1)
    # In the model: transformers' dynamic update (the type name contains "dynamic") grows it past L.
    logits(model, random_ids(1, 2 * TRAINED))
    torch.testing.assert_close(rotary(model).inv_freq, by_parts(THETA, 2.0))
    assert rotary(model).attention_scaling == pytest.approx(0.1 * math.log(2) + 1)


# ---- registry round trip, errors -------------------------------------------------------------------

@pytest.mark.parametrize("spec", [*SCALING_SPECS, "longrope"])
def test_save_and_reload_rebuild_the_same_rotary_embedding(spec, tmp_path):
    feature = LONGROPE if spec == "longrope" else spec
    model = lc.patch(tiny_model("llama"), rope=feature)
    ids = random_ids(1, 40)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)

    with transformers_warnings() as warned:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # after `import hf_longctx` only
    if spec.partition(":")[0] in LONGCTX_ROPE_FUNCTIONS:
        assert not warned, [r.getMessage() for r in warned]
    torch.testing.assert_close(rotary(plain).inv_freq, rotary(model).inv_freq, atol=0, rtol=0)
    assert rotary(plain).attention_scaling == rotary(model).attention_scaling
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)

    loaded = lc.from_pretrained(tmp_path)
    assert lc.patched_config(loaded).rope == parse_feature("rope", feature)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    lc.unpatch(loaded)  # back to the stock embedding the checkpoint was scaled from
    assert STOCK_KEY not in loaded.config.__dict__ and loaded.config.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(logits(loaded, ids), logits(tiny_model("llama"), ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("ntk:1", "`factor` must be a number > 1"),
        ("yarn:0.5", "`factor` must be a number > 1"),
        ("linear", r"RopeScaling\(type='linear'\): needs `factor`"),
        ("abf:0.5", "`base` must be a number > 1"),
        ("self_extend:window=8", "needs `group`"),
        ("dual_chunk:16,16", "`local_size` .16. must be < `chunk_size`"),
        ("ntk:4,window=3", "does not take `window`; accepted: factor, fp32"),
        ("yarn:4,beta_fast=1,beta_slow=2", "`beta_fast` must exceed `beta_slow`"),
        ("default", "changes nothing unless `fp32` is true"),
    ],
)
def test_bad_parameters_raise_naming_them(spec, message):
    with pytest.raises(ValueError, match=message):
        lc.patch(tiny_model("llama"), rope=spec)


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown rope 'xpos'; known: 'abf', 'default', 'dual_chunk'"):
        lc.patch(tiny_model("llama"), rope="xpos:4")
    with pytest.raises(ValueError, match="unknown `type` 'xpos'; accepted: default, linear"):
        lc.RopeScaling(type="xpos", factor=4)


def _edit_saved_rope(path, **changes):
    import json

    data = json.loads((path / "config.json").read_text())
    data["rope_parameters"].update(changes)
    data["rope_parameters"] = {k: v for k, v in data["rope_parameters"].items() if v is not None}
    (path / "config.json").write_text(json.dumps(data))


def test_saved_parameters_are_validated_on_load(tmp_path):
    load_error = (ValueError, StrictDataclassClassValidationError)  # transformers wraps validator errors
    lc.patch(tiny_model("llama"), rope="ntk_by_parts:4").save_pretrained(tmp_path)
    _edit_saved_rope(tmp_path, original_max_position_embeddings=None)
    with pytest.raises(load_error, match="longctx_ntk_by_parts.*missing `original_max_position_embeddings`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _edit_saved_rope(tmp_path, original_max_position_embeddings=256, factor=1.0)
    with pytest.raises(load_error, match="`factor` must be a number > 1"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _edit_saved_rope(tmp_path, factor=4.0, alpha=2)
    with pytest.raises(load_error, match="unknown key.*alpha.*accepted: rope_type, rope_theta"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_remap_types_cannot_share_the_attention_path():
    with pytest.raises(ValueError, match="'self_extend' runs on its own attention path"):
        lc.patch(tiny_model("llama"), rope="self_extend:8,2", attention="sink:64")


def test_a_config_that_refuses_the_type_raises_and_stays_stock():
    model = tiny_model("phi3")  # Phi3Config accepts only default and longrope
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="type='ntk'.*model_type 'phi3'.*longctx_ntk"):
        lc.patch(model, rope="ntk:4")
    assert model.config.to_dict() == before and lc.patched_config(model) is None


# ---- exact restore ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_unpatch_restores_rotary_and_config_exactly(family):
    model = tiny_model(family)
    ids = random_ids(1, 30)
    expected = logits(model, ids)
    config_before = model.config.to_dict()
    module = rotary(model)
    buffers = {name: t for name, t in module._buffers.items()}
    scaling = module.attention_scaling
    spec = "self_extend:8,2" if family == "phi3" else "yarn:4,fp32=true"
    lc.patch(model, rope=spec)
    assert (logits(model, ids) - expected).abs().max() > 1e-4
    lc.unpatch(model)
    assert all(module._buffers[name] is tensor for name, tensor in buffers.items())
    assert module.attention_scaling == scaling and "forward" not in module.__dict__
    assert model.config.to_dict() == config_before
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)


def test_nested_rope_scales_the_full_attention_layers_only():
    config = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation="eager").eval()
    module = rotary(model)
    local = module.sliding_attention_inv_freq
    before = model.config.to_dict()
    lc.patch(model, rope="linear:4")
    assert module.sliding_attention_inv_freq is local
    torch.testing.assert_close(module.full_attention_inv_freq, module.full_attention_original_inv_freq)
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    lc.unpatch(model)
    assert model.config.to_dict() == before


# ---- fp32 RoPE -------------------------------------------------------------------------------------

def bf16_llama():
    """bf16 weights, float32 rotary buffers: what from_pretrained(dtype=torch.bfloat16) gives."""
    model = tiny_model("llama")
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    return model


def test_fp32_rope_rotates_in_float32_and_is_removed_with_the_last_model():
    original = modeling_llama.apply_rotary_pos_emb
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 24, DIM).bfloat16().float(), torch.randn(1, 2, 24, DIM).bfloat16().float()
    position_ids = torch.arange(24)[None] + 9000  # far positions: where bf16 cos/sin blur
    exact = original(q.double(), k.double(), *(t.double() for t in rotary(tiny_model("llama"))(q, position_ids)))

    def rotate(model):
        cos, sin = rotary(model)(q.to(torch.bfloat16), position_ids)
        return modeling_llama.apply_rotary_pos_emb(q.bfloat16(), k.bfloat16(), cos, sin)

    bf16, other = bf16_llama(), bf16_llama()
    plain = rotate(bf16)
    lc.patch(other, rope="default:fp32=true")
    lc.patch(bf16, rope="default:fp32=true")
    assert modeling_llama.apply_rotary_pos_emb is not original
    fp32 = rotate(bf16)
    for got, want in zip(fp32, exact):  # one rounding to bf16, of the float32 rotation
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=2**-8)
    plain_error = sum((p.double() - e).abs().mean() for p, e in zip(plain, exact))
    fp32_error = sum((f.double() - e).abs().mean() for f, e in zip(fp32, exact))
    assert fp32_error < 0.8 * plain_error
    lc.unpatch(bf16)
    assert modeling_llama.apply_rotary_pos_emb is not original  # `other` still uses it
    lc.unpatch(other)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert rotary(bf16)(q.bfloat16(), position_ids)[0].dtype == torch.bfloat16


# ---- Self-Extend and dual-chunk (PyTorch reference) ------------------------------------------------

def rope_at(x, positions):
    """x (B, H, S, D) rotated at integer positions (B, S), rotate-half convention."""
    return rerotate(x, positions, THETA)


@pytest.mark.parametrize("scheme", [RemapScheme("self_extend", window=6, group=3),
                                    RemapScheme("dual_chunk", chunk_size=14, local_size=4)])
def test_reference_equals_attention_with_the_scheme_positions_written_out(scheme):
    torch.manual_seed(0)
    length = 40
    q0, k0, v = (torch.randn(1, 2, length, DIM) for _ in range(3))
    pos = torch.arange(length)[None]
    got = remap_attention(rope_at(q0, pos), rope_at(k0, pos), v, inv_freq=THETA, scheme=scheme, key_chunk=16,
                          query_chunk=8)
    expected = torch.empty_like(got)
    for i in range(length):
        near = scheme.near(torch.tensor(i), pos[0, : i + 1])
        q_pos = torch.where(near, i, scheme.far_query(torch.tensor(i)))
        k_pos = torch.where(near, pos[0, : i + 1], scheme.far_key(pos[0, : i + 1]))
        q = rope_at(q0[:, :, i : i + 1].expand(-1, -1, i + 1, -1), q_pos[None])
        k = rope_at(k0[:, :, : i + 1], k_pos[None])
        weights = torch.softmax((q * k).sum(-1) / math.sqrt(DIM), dim=-1)
        expected[:, :, i] = (weights[..., None] * v[:, :, : i + 1]).sum(-2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_with_everything_near_is_causal_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 30, DIM), torch.randn(2, 2, 30, DIM), torch.randn(2, 2, 30, DIM)
    dense = sink_window_attention(q, k, v, sink_tokens=0, window=None)
    schemes = (RemapScheme("self_extend", window=30, group=4), RemapScheme("dual_chunk", chunk_size=40, local_size=8))
    for scheme in schemes:
        torch.testing.assert_close(remap_attention(q, k, v, inv_freq=THETA, scheme=scheme), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "phi3"])
@pytest.mark.parametrize("spec", ["self_extend:window=64,group=8", "dual_chunk:chunk_size=96,local_size=16"])
def test_schemes_covering_the_sequence_equal_stock(family, spec):
    stock = tiny_model(family)
    ids = random_ids(2, 50)
    expected, tokens = logits(stock, ids), stock.generate(ids[:1], max_new_tokens=10, do_sample=False)
    lc.patch(stock, rope=spec)
    assert stock.config._attn_implementation == "longctx_rope_remap"
    torch.testing.assert_close(logits(stock, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(stock.generate(ids[:1], max_new_tokens=10, do_sample=False), tokens)


@pytest.mark.parametrize("spec", REMAP_SPECS)
def test_decode_with_the_cache_equals_a_full_forward(spec):
    model = lc.patch(tiny_model("llama"), rope=spec)
    ids = random_ids(1, 45)
    assert (logits(model, ids) - logits(tiny_model("llama"), ids)).abs().max() > 1e-3  # the scheme bites
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = logits(model, out.sequences[:, :-1])
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, 44 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", REMAP_SPECS)
def test_left_padding_and_packing_equal_separate_runs(spec):
    model = lc.patch(tiny_model("qwen2"), rope=spec)
    short, long = random_ids(1, 21, seed=3), random_ids(1, 33, seed=4)
    batch = torch.zeros(2, 33, dtype=torch.long)
    batch[0, 12:], batch[1] = short[0], long[0]
    mask = (torch.arange(33) >= 12).long()[None].repeat(2, 1)
    mask[1] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, single in enumerate((short, long)):
        alone = model.generate(single, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, 33:], alone[0, single.shape[1]:]), f"row {row}"
    packed = torch.cat([short, long], dim=1)
    got = logits(model, packed, position_ids=torch.cat([torch.arange(21), torch.arange(33)])[None])
    torch.testing.assert_close(got[:, :21], logits(model, short), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 21:], logits(model, long), atol=1e-5, rtol=1e-5)


def test_remap_attention_without_a_rope_feature_names_what_is_missing():
    model = AutoModelForCausalLM.from_config(tiny_model("llama").config, attn_implementation="longctx_rope_remap")
    with pytest.raises(ValueError, match="longctx_rope_remap needs a rope feature of type 'self_extend'"):
        logits(model, random_ids(1, 8))


def test_remap_round_trip_and_unpatch(tmp_path):
    model = lc.patch(tiny_model("mistral"), rope="self_extend:window=10,group=3")
    ids = random_ids(1, 40)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = lc.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "longctx_rope_remap"
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    lc.unpatch(loaded)
    assert loaded.config._attn_implementation == "sdpa" and not hasattr(loaded.config, "longctx")


# ---- E2-LLM augmentation ---------------------------------------------------------------------------

def test_e2llm_scale_alone_is_linear_scaling():
    ids = random_ids(2, 30)
    positions = torch.arange(30)[None].repeat(2, 1)
    augment = E2LLMAugmentation(max_position=30, scales=(4,))  # offset range [0, 0]
    scaled = augment(positions, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled, positions / 4.0)
    mask = torch.ones_like(ids)
    got = logits(tiny_model("llama"), ids, position_ids=scaled, attention_mask=mask)
    torch.testing.assert_close(got, logits(lc.patch(tiny_model("llama"), rope="linear:4"), ids), atol=1e-5, rtol=1e-5)


def test_e2llm_draws_scales_and_skips_per_sample():
    augment = E2LLMAugmentation(max_position=1000, scales=(1, 2, 8))
    positions = torch.arange(50)[None].repeat(64, 1)
    out = augment(positions, generator=torch.Generator().manual_seed(0))
    scales = 1 / out.diff(dim=1).min(dim=1).values  # every step but the skip is 1 / g
    assert set(scales.round().tolist()) == {1.0, 2.0, 8.0}
    steps = out.diff(dim=1) * scales[:, None]
    skips = steps.max(dim=1).values - 1
    assert skips.min() >= 0 and skips.max() <= 950 and skips.max() > 100
    with pytest.raises(ValueError, match="`scales` must be a non-empty list of numbers >= 1"):
        E2LLMAugmentation(max_position=100, scales=(0.5,))
    with pytest.raises(ValueError, match="exceed `max_position`"):
        E2LLMAugmentation(max_position=10)(positions)
