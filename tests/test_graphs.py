"""Graph-captured decoding (``hf_longctx.cache.graphs``): the static one-token step and ``graph_generate``.

CPU tests run the static steps eagerly (graphs are CUDA-only) and check the contract a CUDA graph relies on: the
same tokens as ``generate`` with the same cache, inputs and cache buffers at fixed addresses with fixed shapes, and
no host sync inside a step. The CUDA tests replay graphs and compare with the same steps run eagerly and with
plain ``generate``.
"""

import dataclasses

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_longctx as lc
from hf_longctx.attention import kv as kv_attention
from hf_longctx.cache import GraphDecoder, LongCtxLayer
from hf_longctx.cache.graphs import _prefill

FAMILY_NAMES = list(FAMILIES)
PROMPT, NEW = 40, 24
EVICTIONS = [
    "streaming:budget=20,every=4",
    "snapkv:budget=24,sink_tokens=2,window=4,recent=8,every=3",
    "h2o:budget=24,sink_tokens=2,window=4,recent=8",
]


def prompt(batch=2, device="cpu"):
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (batch, PROMPT), device=device)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :7] = 0  # left padding
    return ids, mask


def prepared(model, attention=None, kv=None):
    """Patch for kv (or only the ``longctx_kv`` attention without eviction)."""
    features = {key: value for key, value in (("attention", attention), ("kv", kv)) if value}
    if features:
        lc.patch(model, **features)
    model.set_attn_implementation(kv_attention.KV_ATTENTION_NAME)
    return model


def both(model, ids, mask, kv=None, sample=False, new=NEW):
    """(generate with a LongCtxCache, graph_generate with a cuda_graphs cache), same seed."""
    torch.manual_seed(5)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=sample,
                           past_key_values=lc.LongCtxCache(model, kv=kv))
    torch.manual_seed(5)
    cache = lc.LongCtxCache(model, kv=kv, cuda_graphs=True)
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=sample, past_key_values=cache,
                             custom_generate=lc.graph_generate)
    return eager, graphed, cache


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("sample", [False, True])
def test_graph_generate_equals_generate_without_eviction(family, sample):
    model = prepared(tiny_model(family))
    ids, mask = prompt()
    eager, graphed, cache = both(model, ids, mask, sample=sample)
    assert torch.equal(eager, graphed)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    assert not any(layer.static for layer in cache.layers)  # the loop leaves static decoding


@pytest.mark.parametrize("kv", EVICTIONS)
@pytest.mark.parametrize("sample", [False, True])
def test_graph_generate_equals_generate_with_eviction(kv, sample):
    model = prepared(tiny_model("llama"), kv=kv)
    ids, mask = prompt()
    eager, graphed, cache = both(model, ids, mask, kv=kv, sample=sample)
    assert torch.equal(eager, graphed)
    assert max(cache.stored_lengths) < PROMPT  # it evicted


SINK_RULES = [
    ("sink:16,2", "streaming:every=4"),
    ("sink:16,2,positions=cache", "streaming:every=4"),  # moved sinks
    ("sink:16,2,distance_limit=20", "snapkv:budget=30,sink_tokens=2,window=4,recent=8,every=2"),
    ("sink:16,2", None),  # a window without eviction: the kernels count the query one past its key
]


@pytest.mark.parametrize("attention,kv", SINK_RULES)
def test_graph_generate_applies_sink_attention_rules(attention, kv):
    model = prepared(tiny_model("llama"), attention=attention, kv=kv)
    ids, mask = prompt()
    eager, graphed, _ = both(model, ids, mask, kv=kv)
    assert torch.equal(eager, graphed)


def test_gemma2_sliding_layers_become_longctx_layers_under_graphs():
    model = prepared(tiny_model("gemma2"))
    cache = lc.LongCtxCache(model, cuda_graphs=True)
    assert all(isinstance(layer, LongCtxLayer) for layer in cache.layers)
    assert not all(isinstance(layer, LongCtxLayer) for layer in lc.LongCtxCache(model).layers)


def decoder_after_prefill(model, kv=None, batch=2):
    ids, mask = prompt(batch)
    cache = lc.LongCtxCache(model, kv=kv, cuda_graphs=True)
    with torch.no_grad():
        logits, positions = _prefill(model, cache, ids, mask if batch > 1 else None, None)
    decoder = GraphDecoder(model, cache)
    decoder.start(NEW, padding=mask if batch > 1 else None)
    return decoder, logits, positions


@pytest.mark.parametrize("kv", [None, EVICTIONS[1]])
def test_static_step_keeps_its_buffers_and_shapes(kv, monkeypatch):
    """What a graph replays: fixed input buffers, cache buffers that never move, keys of the capacity's shape."""
    model = prepared(tiny_model("llama"), kv=kv)
    decoder, logits, positions = decoder_after_prefill(model, kv)
    shapes = []
    static_attention = kv_attention._static_attention

    def spy(module, layer, query, key, *args):
        shapes.append(tuple(key.shape))
        return static_attention(module, layer, query, key, *args)

    monkeypatch.setattr(kv_attention, "_static_attention", spy)
    inputs = (decoder.input_ids.data_ptr(), decoder.position_ids.data_ptr())
    buffers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in decoder.layers]
    with torch.no_grad():
        for _ in range(NEW - 1):
            positions = positions + 1
            logits = decoder.step(logits.argmax(-1), positions)
    assert (decoder.input_ids.data_ptr(), decoder.position_ids.data_ptr()) == inputs
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in decoder.layers] == buffers
    capacity = decoder.layers[0].capacity
    assert len(shapes) == (NEW - 1) * len(decoder.layers) and {s[2] for s in shapes} == {capacity}
    assert [int(layer.static_length) for layer in decoder.layers] == decoder.cache.stored_lengths
    assert decoder.replays == 0 and decoder.eager_steps == NEW - 1  # CPU: graphs are a no-op
    decoder.stop()


@pytest.mark.parametrize("kv", [None, EVICTIONS[1]])
def test_a_replayed_step_advances_the_host_counters_as_an_eager_step(kv):
    """``advance_static`` (the host bookkeeping after a graph replay) leaves every layer's host counters where the
    eager static step leaves them (CPU runs no replay, so this is where the replay's bookkeeping is checked)."""
    model = prepared(tiny_model("llama"), kv=kv)
    decoder, logits, positions = decoder_after_prefill(model, kv)
    with torch.no_grad():
        while not all(layer.static_ready() for layer in decoder.layers):  # a step a graph would replay
            positions = positions + 1
            logits = decoder.step(logits.argmax(-1), positions)
        before = [layer.host_counters() for layer in decoder.layers]
        decoder.step(logits.argmax(-1), positions + 1)
    eager = [layer.host_counters() for layer in decoder.layers]
    for layer, saved in zip(decoder.layers, before):
        layer.restore_counters(saved)
        layer.advance_static()
    assert [layer.host_counters() for layer in decoder.layers] == eager
    decoder.stop()


class HostSync(RuntimeError):
    pass


@pytest.mark.parametrize("kv", [None, EVICTIONS[1]])
def test_a_ready_static_step_makes_no_host_sync(kv, monkeypatch):
    """Every step ``static_ready`` lets a graph stand for reads no device value on the host (CUDA graph capture
    would fail on one): run such steps with ``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``float()`` raising."""
    model = prepared(tiny_model("llama"), kv=kv)
    decoder, logits, positions = decoder_after_prefill(model, kv, batch=2)
    tokens = logits.argmax(-1)

    def refuse(self, *args, **kwargs):
        raise HostSync("a host sync inside a static step")

    ready = 0
    with torch.no_grad():
        for _ in range(NEW - 1):
            positions = positions + 1
            if all(layer.static_ready() for layer in decoder.layers):
                with monkeypatch.context() as patched:
                    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                        patched.setattr(torch.Tensor, name, refuse)
                    logits = decoder.step(tokens, positions)
                ready += 1
            else:
                logits = decoder.step(tokens, positions)
            tokens = logits.argmax(-1)
    assert ready >= (NEW - 1) // 2  # evictions and scorings aside, steps are ready
    decoder.stop()


def test_the_spy_catches_a_host_sync(monkeypatch):
    """The spy of the test above fails on a step that syncs."""
    model = prepared(tiny_model("llama"))
    decoder, logits, positions = decoder_after_prefill(model)
    forward = decoder._forward
    monkeypatch.setattr(decoder, "_forward", lambda: (forward(), decoder.logits.max().item()))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(HostSync("item")))
    with pytest.raises(HostSync), torch.no_grad():
        decoder.step(logits.argmax(-1), positions + 1)


def test_graph_decoder_refuses_what_it_cannot_run():
    model = tiny_model("llama")  # sdpa
    cache = lc.LongCtxCache(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="longctx_kv"):
        GraphDecoder(model, cache)
    model = prepared(tiny_model("gemma2"))
    with pytest.raises(ValueError, match="LongCtxLayer"):
        GraphDecoder(model, lc.LongCtxCache(model))  # its sliding layer stays transformers' own
    model = prepared(tiny_model("llama"), kv="think:budget=30,sink_tokens=2,window=4,recent=8")
    ids, _ = prompt(1)
    with pytest.raises(ValueError, match="think"):
        model.generate(ids, max_new_tokens=4, custom_generate=lc.graph_generate,
                       past_key_values=lc.LongCtxCache(model, kv=lc.patched_config(model).kv, cuda_graphs=True))
    with pytest.raises(ValueError, match="output_scores"):
        model.generate(ids, max_new_tokens=4, custom_generate=lc.graph_generate, output_scores=True,
                       return_dict_in_generate=True)
    for rope in ("dynamic:4", "dynamic_yarn:4"):  # frequencies updated on the host from each step's length
        model = tiny_model("llama")
        lc.patch(model, rope=rope)
        model.set_attn_implementation(kv_attention.KV_ATTENTION_NAME)
        with pytest.raises(ValueError, match=rope.split(":")[0]):
            GraphDecoder(model, lc.LongCtxCache(model, cuda_graphs=True))


def test_graph_generate_builds_its_cache_in_place_of_generates_default():
    model = prepared(tiny_model("llama"))
    ids, mask = prompt()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, custom_generate=lc.graph_generate,
                         return_dict_in_generate=True)
    assert isinstance(out.past_key_values, lc.LongCtxCache) and out.past_key_values.cuda_graphs
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, past_key_values=lc.LongCtxCache(model))
    assert torch.equal(out.sequences, reference)


def test_graph_generate_on_a_model_patched_with_kv_keeps_its_eviction():
    """generate's default cache on a patched model (a LongCtxCache without cuda_graphs) is rebuilt with them."""
    kv = EVICTIONS[0]
    model = prepared(tiny_model("gemma2"), kv=kv)
    ids, mask = prompt()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, custom_generate=lc.graph_generate,
                         return_dict_in_generate=True)
    assert out.past_key_values.cuda_graphs and out.past_key_values.kv == lc.patched_config(model).kv
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=NEW))


# ------------------------------------------------------------------------------------------------ CUDA
def cuda_model(family, dtype=torch.bfloat16, **kv):
    model = prepared(tiny_model(family), **kv)
    return model.to("cuda", dtype)


def graphed_and_eager(model, ids, mask, kv=None, sample=False, new=NEW):
    """graph_generate with graphs, and the same static steps without graphs (same kernels: bit-identical)."""
    outs = []
    for graphs in (True, False):
        torch.manual_seed(5)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=sample, graphs=graphs,
                                   past_key_values=lc.LongCtxCache(model, kv=kv, cuda_graphs=True),
                                   custom_generate=lc.graph_generate))
    return outs


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("sample", [False, True])
def test_cuda_graphs_replay_the_eager_steps(family, sample):
    model = cuda_model(family)
    ids, mask = prompt(device="cuda")
    graphed, eager = graphed_and_eager(model, ids, mask, sample=sample)
    assert torch.equal(graphed, eager)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, past_key_values=lc.LongCtxCache(model))
    if not sample:  # plain generate attends true-length keys (other kernel splits): bf16 may part on a near tie
        assert (reference == graphed).float().mean() >= 0.9


@pytest.mark.cuda
@pytest.mark.parametrize("kv", EVICTIONS)
def test_cuda_graphs_with_eviction(kv):
    model = cuda_model("llama", kv=kv)
    ids, mask = prompt(device="cuda")
    graphed, eager = graphed_and_eager(model, ids, mask, kv=kv, new=48)
    assert torch.equal(graphed, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("attention,kv", SINK_RULES)
def test_cuda_graphs_with_sink_rules(attention, kv):
    """Moved sinks too: the kernel takes the key spans from the device, so these steps are captured."""
    model = prepared(tiny_model("llama"), attention=attention, kv=kv).to("cuda", torch.bfloat16)
    ids, mask = prompt(device="cuda")
    graphed, eager = graphed_and_eager(model, ids, mask, kv=kv, new=48)
    assert torch.equal(graphed, eager)


@pytest.mark.cuda
def test_cuda_graphs_replay_most_steps_on_an_8b_shaped_model():
    """Llama-3-8B layer shapes, 2 layers, bf16, a 4096-token prompt: one capture, every later step replayed, the
    same logits as the static steps run eagerly (the same kernels)."""
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384,
                         rope_theta=500000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(kv_attention.KV_ATTENTION_NAME)
    ids = torch.randint(0, config.vocab_size, (1, 4096), device="cuda")
    runs = []
    for graphs in (True, False):
        cache = lc.LongCtxCache(model, cuda_graphs=True)
        with torch.no_grad():
            logits, positions = _prefill(model, cache, ids, None, None)
            decoder = GraphDecoder(model, cache, graphs=graphs)
            decoder.start(32)
            tokens, steps = [], []
            for _ in range(32):
                tokens.append(logits.argmax(-1))
                positions = positions + 1
                logits = decoder.step(tokens[-1], positions)
                steps.append(logits.clone())
            decoder.stop()
        runs.append((torch.stack(tokens), torch.stack(steps), decoder))
    (graph_tokens, graph_logits, graphed), (eager_tokens, eager_logits, eager) = runs
    assert graphed.captures == 1 and graphed.eager_steps == 1 and graphed.replays == 31
    assert eager.replays == 0
    assert torch.equal(graph_tokens, eager_tokens) and torch.equal(graph_logits, eager_logits)


def test_eviction_specs_are_valid():
    """The specs above parse (a typo would make the eviction tests test nothing)."""
    for spec in EVICTIONS:
        assert dataclasses.is_dataclass(lc.LongCtxConfig.coerce(None, kv=spec).kv)
