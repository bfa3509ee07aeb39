"""Speculative decoding: the verification rules, greedy output identical to plain generate (tiny families and
the reference target/draft pair, batch 1 and 4 with left padding), sampling's distribution (a two-sample test
that a wrong acceptance rule fails), the patch, config.json, and bad input."""

from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, STOCK_ATTENTION, random_ids, tiny_model
from transformers import AutoModelForCausalLM, LogitsProcessorList

import hf_longctx as lc
from hf_longctx.cache import GraphDecoder
from hf_longctx.config import SinkAttention, parse_feature
from hf_longctx.speculative import DraftModel, Sequences, SpeculationGain, common_acceptance, greedy_accept, sample_accept
from hf_longctx.speculative import generate as spec_generate
from hf_longctx.speculative.forward import forward_unseen

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


def left_padded(batch, length, vocab, seed=1):
    """(ids, mask): random ids with rows 1 and 2 left-padded by 5 and 11 tokens."""
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pads in ((1, 5), (2, 11)):
        if row < batch:
            mask[row, :pads] = 0
    return ids.masked_fill(mask == 0, 0), mask


def speculative(model, draft, **kwargs):
    spec = lc.Speculative(draft=draft, **{k: kwargs.pop(k) for k in ("num_draft_tokens", "threshold") if k in kwargs})
    return model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)


# ---------------------------------------------------------------------------------------- the rules
def test_greedy_accept_takes_the_longest_matching_prefix():
    scores = torch.full((3, 4, 5), -1.0)
    target = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 4], [0, 2, 3, 4]])
    scores.scatter_(-1, target[..., None], 1.0)
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    accepted, next_token = greedy_accept(draft, scores)
    assert accepted.tolist() == [3, 1, 0] and next_token.tolist() == [4, 0, 0]


def test_common_acceptance_keeps_verified_tokens_of_every_row():
    draft = torch.tensor([[5, 6, 7], [5, 8, 9], [1, 1, 1]])
    accepted, next_token = torch.tensor([3, 1, 0]), torch.tensor([40, 41, 42])
    n, tokens = common_acceptance(draft, accepted, next_token, active=torch.tensor([True, True, False]))
    assert n == 1 and tokens.tolist() == [[5, 6], [5, 41], [1, 42]]  # row 0 keeps its accepted draft token 6


def first_token_distribution(rule, p, q, samples=200_000):
    """The distribution of the first token a rule emits after one draft token drawn from q (one row per sample)."""
    generator = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q, samples, replacement=True, generator=generator)[:, None]
    q_rows, p_rows = q.expand(samples, 1, -1), p.expand(samples, 2, -1)
    accepted, next_token = rule(draft, q_rows, p_rows, generator)
    first = torch.where(accepted > 0, draft[:, 0], next_token)
    return torch.bincount(first, minlength=p.shape[0]).float() / samples


def resample_from_p(draft_tokens, draft_probs, target_probs, generator=None):
    """A wrong rule: after a rejection it draws from p instead of norm(max(p - q, 0))."""
    accepted, _ = sample_accept(draft_tokens, draft_probs, target_probs, generator)
    rows = torch.arange(draft_tokens.shape[0])
    return accepted, torch.multinomial(target_probs[rows, accepted], 1, generator=generator)[:, 0]


def test_rejection_sampling_gives_the_target_distribution_and_a_wrong_rule_does_not():
    p, q = torch.tensor([0.6, 0.2, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    total_variation = lambda dist: 0.5 * (dist - p).abs().sum().item()  # noqa: E731
    assert total_variation(first_token_distribution(sample_accept, p, q)) < 0.01
    assert total_variation(first_token_distribution(resample_from_p, p, q)) > 0.1
    assert total_variation(first_token_distribution(sample_accept, p, p)) < 0.01  # p == q: all accepted


# ------------------------------------------------------------------------------ greedy is lossless
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_generate_on_the_tiny_families(family):
    model, draft = tiny_model(family), tiny_model(family, seed=5)
    for batch in (1, 4):
        ids, mask = left_padded(batch, 20, 96)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expected = model.generate(**kwargs)
        assert torch.equal(speculative(model, draft, num_draft_tokens=3, **kwargs), expected), batch


def test_greedy_equals_generate_with_early_eos_and_adaptive_length():
    model, draft = tiny_model("qwen2", vocab_size=8), tiny_model("qwen2", seed=3, vocab_size=8)
    ids, mask = left_padded(4, 12, 8, seed=4)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=4)
    expected = model.generate(**kwargs)
    assert (expected[:, 12:] == 0).any() and (expected[:, -1] != 0).any()  # some rows finished early and were padded
    assert torch.equal(speculative(model, draft, **kwargs), expected)
    assert torch.equal(speculative(model, draft, num_draft_tokens="adaptive", threshold=0.3, **kwargs), expected)


def test_the_target_as_its_own_draft_is_accepted_whole():
    model, twin = tiny_model("llama"), tiny_model("llama")  # the same weights
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    kwargs = dict(input_ids=random_ids(1, 16), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    expected = model.generate(**kwargs)
    calls.clear()
    assert torch.equal(speculative(model, twin, num_draft_tokens=4, **kwargs), expected)
    assert len(calls) == 1 + 3  # the prefill (1 token), then 3 rounds of 4 drafts + 1, all accepted


def test_greedy_equals_generate_on_the_reference_models():
    model = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-target-20m", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-draft-3m", dtype=torch.float32).eval()
    for batch in (1, 4):
        ids, mask = left_padded(batch, 24, 8192)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(speculative(model, draft, **kwargs), model.generate(**kwargs)), batch


def test_greedy_with_a_long_ctx_cache_and_an_evicting_draft():
    model, draft = tiny_model("llama"), lc.patch(tiny_model("llama", seed=5), kv="streaming:budget=16,sink_tokens=4")
    ids = random_ids(2, 40)
    kwargs = dict(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = model.generate(**kwargs)
    spec = lc.Speculative(draft=draft, draft_kv="streaming:budget=16,sink_tokens=4")
    got = model.generate(
        **kwargs, past_key_values=lc.LongCtxCache(model), custom_generate=lc.speculative_generate, speculative=spec
    )
    assert torch.equal(got, expected)


def test_adaptive_drafting_stops_under_the_threshold():
    draft = tiny_model("llama", seed=5)  # a random model is never 99% sure
    feature = lc.Speculative(draft=draft, num_draft_tokens="adaptive", threshold=0.99, max_draft_tokens=6)
    drafter = DraftModel(draft, feature, vocab_size=96)
    ids = random_ids(2, 10)
    drafter.prefill(Sequences(ids[:, :-1], None))
    active = torch.ones(2, dtype=torch.bool)
    tokens, probs = drafter.propose(Sequences(ids, None), 6, LogitsProcessorList(), do_sample=False, active=active)
    assert tokens.shape == (2, 1) and probs.shape == (2, 1, 96)


def test_the_gain_rule_switches_speculation_off_only_when_it_does_not_pay():
    """Measured speculative rounds, then measured plain steps; uncounted warm-up rounds first of each."""
    decisions = {}
    for name, (tokens, seconds) in {"paying": (3.0, 0.010), "losing": (3.0, 0.050)}.items():
        gain = SpeculationGain(warmup=2)
        modes = []
        for _ in range(12):
            mode = gain.mode
            modes.append(mode)
            # a speculative round emits 3 tokens a row; a plain step 1 token in 10 ms (the uncounted ones slower)
            gain.record(mode, *((tokens, seconds) if mode == "speculative" else (1.0, 0.010)))
        decisions[name] = gain
        assert modes[:3] == ["speculative"] * 3 and modes[3:8] == ["plain"] * 5  # 1 + 2, then 3 + 2 measured
        assert modes[8:] == ["speculative" if gain.enabled else "plain"] * 4
    assert decisions["paying"].enabled and decisions["paying"].gain == pytest.approx(3.0)
    assert not decisions["losing"].enabled and decisions["losing"].gain == pytest.approx(0.6)
    with pytest.raises(ValueError, match="`warmup` must be an integer >= 1"):
        SpeculationGain(warmup=0)


# --------------------------------------------------------------------- sampling keeps the distribution
def sharp_tiny(seed):
    """A tiny llama with 8 tokens and sharpened (far from uniform) next-token distributions."""
    model = tiny_model("llama", seed=seed, vocab_size=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def second_token_distribution(generate, rows=3000, seed=0):
    """The distribution of the second new token, the first one drafted (the first comes from the prefill)."""
    ids = torch.tensor([[5, 3, 7, 4, 6]]).expand(rows, -1)
    torch.manual_seed(seed)
    out = generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=True)
    return torch.bincount(out[:, -2], minlength=8).float() / rows


def test_sampling_two_sample_test(monkeypatch):
    model, draft = sharp_tiny(0), sharp_tiny(3)
    expected = second_token_distribution(model.generate, seed=1)
    ours = second_token_distribution(lambda **kw: speculative(model, draft, **kw), seed=2)
    monkeypatch.setattr(spec_generate, "sample_accept", resample_from_p)
    wrong = second_token_distribution(lambda **kw: speculative(model, draft, **kw), seed=2)
    total_variation = lambda dist: 0.5 * (dist - expected).abs().sum().item()  # noqa: E731
    assert total_variation(ours) < 0.05 and total_variation(wrong) > 0.1  # same-distribution noise: about 0.02


# ------------------------------------------------------------------------- patch, config, bad input
def test_patch_routes_generate_and_unpatch_restores_it():
    model, draft = tiny_model("llama"), tiny_model("llama", seed=5)
    kwargs = dict(input_ids=random_ids(1, 12), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = model.generate(**kwargs)
    calls = []
    draft.register_forward_hook(lambda *args: calls.append(1))
    lc.patch(model, speculative=lc.Speculative(draft=draft))
    assert torch.equal(model.generate(**kwargs), expected) and calls
    assert model.config.longctx["speculative"]["draft"] is None  # built in memory: no name to record
    lc.unpatch(model)
    assert "generate" not in model.__dict__ and "longctx" not in model.config.__dict__


def test_a_draft_built_in_memory_cannot_be_reloaded_from_config(tmp_path):
    model = lc.patch(tiny_model("llama"), speculative=lc.Speculative(draft=tiny_model("llama", seed=5)))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`draft` is None.*built in memory.*lc.Speculative\\(draft="):
        lc.from_pretrained(tmp_path)


def test_a_draft_by_path_round_trips():
    path = str(CARDS / "longctx-draft-3m")
    model = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-target-20m", dtype=torch.float32)
    lc.patch(model, speculative=f"draft:{path},3")
    data = model.config.longctx["speculative"]
    assert data["type"] == "draft" and data["draft"] == path and data["num_draft_tokens"] == 3
    assert parse_feature("speculative", data) == lc.Speculative(draft=path, num_draft_tokens=3)
    ids = torch.randint(3, 8192, (1, 10), generator=torch.Generator().manual_seed(0))
    got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got, lc.unpatch(model).generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_draft_tokens": 0}, "`num_draft_tokens` must be an integer >= 1"),
        ({"num_draft_tokens": "fast"}, "`num_draft_tokens` must be an integer >= 1"),
        ({"threshold": 0}, r"`threshold` must be a number in \(0, 1\)"),
        ({"threshold": 1.0}, r"`threshold` must be a number in \(0, 1\)"),
        ({"max_draft_tokens": 0}, "`max_draft_tokens` must be an integer >= 1"),
        ({"draft": 3}, "`draft` must be 'self'"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.Speculative(**kwargs)


def test_a_draft_with_another_vocabulary_is_refused():
    model, draft = tiny_model("llama"), tiny_model("llama", vocab_size=128)
    with pytest.raises(ValueError, match=r"`draft` vocabulary size \(128\) differs from the target's \(96\)"):
        speculative(model, draft, input_ids=random_ids(1, 8), max_new_tokens=4)


def test_self_speculation_view_must_be_a_streaming_budget():
    with pytest.raises(ValueError, match="draft='self', `draft_kv` is the view.*'streaming'"):
        lc.Speculative(draft="self", draft_kv="snapkv:64")
    with pytest.raises(ValueError, match="draft='self', `draft_kv` is the view"):
        lc.Speculative(draft="self", draft_kv="streaming:budget=4,sink_tokens=4")
    with pytest.raises(ValueError, match="its fields make it a 'self' feature"):
        parse_feature("speculative", "draft")


# ------------------------------------------------------------------------------------- self-speculation
VIEW = "streaming:budget=12,sink_tokens=2"  # much shorter than the prompts: the view really compresses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_self_speculation_greedy_equals_generate_on_the_tiny_families(family):
    model = tiny_model(family)
    for batch in (1, 4):
        ids, mask = left_padded(batch, 24, 96)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expected = model.generate(**kwargs)
        spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens=3)
        out = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec,
                             return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected), batch
        assert isinstance(out.past_key_values, lc.LongCtxCache)
        assert model.config._attn_implementation == STOCK_ATTENTION[family]  # restored after the call


def test_self_speculation_drafts_through_the_view_and_verifies_exactly():
    """The draft forwards attend through sinks + window (their logits differ from the full cache's), and each
    round's verification overwrites what they wrote: the output is still plain generate's."""
    model = tiny_model("llama")
    kwargs = dict(input_ids=random_ids(1, 40), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    expected = model.generate(**kwargs)
    drafted = {}

    def count(spec):
        calls = []
        hook = model.register_forward_hook(lambda module, args, kw, out: calls.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
        got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
        hook.remove()
        assert torch.equal(got, expected)
        return calls

    wide = count(lc.Speculative(draft="self", draft_kv="streaming:512", num_draft_tokens=4))
    narrow = count(lc.Speculative(draft="self", draft_kv="streaming:budget=6,sink_tokens=2", num_draft_tokens=4))
    drafted["wide"], drafted["narrow"] = wide, narrow
    # A view holding the whole context drafts the target's own tokens: every round accepts all 4 (+1 bonus).
    assert wide.count(5) == 3 and len(wide) == 1 + 3 * (4 + 1)
    # A 6-token view drafts worse tokens: more rounds, still the same output.
    assert narrow.count(5) < wide.count(5) or len(narrow) > len(wide)


def test_self_speculation_over_an_evicting_cache_stays_within_its_budget():
    """With eviction on the target's cache, evictions fall at round boundaries (deferred to the crop), so the
    output is not claimed token-identical to plain generate with the same eviction; the memory bound holds."""
    model = lc.patch(tiny_model("qwen2"), kv="snapkv:budget=24,window=4")
    ids, mask = left_padded(3, 40, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens=3)
    out = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (3, 52)
    assert torch.equal(out.sequences[:, :41], model.generate(**{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}))
    assert max(out.past_key_values.stored_lengths) <= 24 + 3 + 1


def test_patch_with_self_speculation_and_adaptive_length():
    model = tiny_model("mistral")
    ids, mask = left_padded(4, 20, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    expected = model.generate(**kwargs)
    lc.patch(model, speculative=lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens="adaptive", threshold=0.2))
    assert model.config.longctx["speculative"]["type"] == "self"
    assert torch.equal(model.generate(**kwargs), expected)
    lc.unpatch(model)
    assert "generate" not in model.__dict__


def test_rows_advance_by_their_own_accepted_counts():
    """Batch 4, a draft model: rows accept different numbers of drafts; the rejected ones stay as holes in the
    shared slot layout (the cache has seen more slots than any row has tokens) and no row is held back."""
    model, draft = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():  # a perturbed twin: it agrees with the target often, not always
        draft.lm_head.weight.add_(0.5 * torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    ids, mask = left_padded(4, 20, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = model.generate(**kwargs)
    spec = lc.Speculative(draft=draft, num_draft_tokens=3)
    out = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    slots = out.past_key_values.get_seq_length() + 1  # the cache has seen every slot but the last
    assert slots > expected.shape[1]  # holes: rows advanced by their own counts, nothing re-padded


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_equals_generate_on_the_gpu_reference_models():
    """fp32 on the GPU (the Triton kernels): self-speculation and the draft model, batch 1 and 4 left padded."""
    model = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-target-20m", dtype=torch.float32).cuda().eval()
    draft = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-draft-3m", dtype=torch.float32).cuda().eval()
    lc.patch(model, kv="streaming:budget=4096")  # longctx_kv + LongCtxCache on both sides, no eviction reached
    for batch in (1, 4):
        ids, mask = left_padded(batch, 600, 8192)
        kwargs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, min_new_tokens=24,
                      do_sample=False)
        expected = model.generate(**kwargs)
        for spec in (lc.Speculative(draft="self", draft_kv="streaming:256"), lc.Speculative(draft=draft)):
            got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
            assert torch.equal(got, expected), (batch, spec.name)


# --------------------------------------------------------------------- self-speculation with CUDA graphs
def count_static_draft_steps(monkeypatch):
    """Count the draft steps that go through ``GraphDecoder.step`` (the static steps a graph replays)."""
    calls = []
    step = GraphDecoder.step
    monkeypatch.setattr(GraphDecoder, "step", lambda self, *args: (calls.append(1), step(self, *args))[1])
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_self_speculation_with_graphs_requested_on_cpu_equals_generate(family, monkeypatch):
    """On CPU the draft steps are the static steps, run eagerly: greedy tokens are still plain generate's, batch
    1 and 4 left-padded, and the cache leaves static decoding with the device counter at its stored length."""
    model, calls = tiny_model(family), count_static_draft_steps(monkeypatch)
    for batch in (1, 4):
        ids, mask = left_padded(batch, 24, 96)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expected = model.generate(**kwargs)
        calls.clear()
        spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens=3, cuda_graphs=True)
        out = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec,
                             return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected), batch
        assert len(calls) >= 3 * 2  # the rounds drafted through the static steps (the first draft of a round too)
        assert out.past_key_values.cuda_graphs and not any(layer.static for layer in out.past_key_values.layers)


def test_self_speculation_with_graphs_adaptive_and_a_cache_passed_in(monkeypatch):
    """A cache passed in, no processor reading the ids: the graph-captured rounds run (``StaticRounds``)."""
    model, calls = tiny_model("llama"), count_static_rounds(monkeypatch)
    ids, mask = left_padded(4, 20, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    expected = model.generate(**kwargs)
    spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens="adaptive", threshold=0.2, cuda_graphs=True)
    got = model.generate(**kwargs, past_key_values=lc.LongCtxCache(model, cuda_graphs=True),
                         custom_generate=lc.speculative_generate, speculative=spec)
    assert torch.equal(got, expected) and calls


@pytest.mark.parametrize("pays", [False, True])
def test_adaptive_switch_off_runs_plain_static_steps(monkeypatch, pays):
    """When the measured rule decides (here: forced) that speculation does not pay, the rest of the call runs plain
    steps through the decoder's static step (graph-replayed on CUDA), without drafting; tokens stay generate's."""
    from hf_longctx.speculative import gain as gain_module

    model, plain_static = tiny_model("llama"), []
    step = GraphDecoder.step
    monkeypatch.setattr(GraphDecoder, "step", lambda self, *args: (
        plain_static.append(self.layers[0].view is None), step(self, *args))[1])
    monkeypatch.setattr(gain_module.SpeculationGain, "gain", property(lambda self: 2.0 if pays else 0.5))
    proposals = []
    propose = spec_generate.SelfDraft.propose
    monkeypatch.setattr(spec_generate.SelfDraft, "propose", lambda self, *a, **k: (proposals.append(1),
                                                                                    propose(self, *a, **k))[1])
    ids, mask = left_padded(4, 20, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    expected = model.generate(**kwargs)
    spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens="adaptive", threshold=0.01,
                          max_draft_tokens=2, cuda_graphs=True)
    got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
    assert torch.equal(got, expected)
    warmup = gain_module.SpeculationGain().warmup
    # warm-up rounds draft (1 + warmup), then 3 + warmup plain steps; afterwards drafting only if it pays
    assert (len(proposals) > 1 + warmup) == pays
    assert sum(plain_static) >= (29 - 2 * (1 + warmup) if not pays else 3 + warmup)  # plain steps were static


def test_static_draft_steps_attend_through_the_view():
    """A static draft step reads the same sinks + window as the eager draft step through the view."""
    model = tiny_model("llama")
    model.set_attn_implementation("longctx_kv")
    ids = random_ids(1, 41)
    view = SinkAttention(sink_tokens=2, window=4)
    logits = []
    for static in (False, True):
        cache = lc.LongCtxCache(model, cuda_graphs=True)
        with torch.no_grad():
            forward_unseen(model, cache, ids[:, :40], None, keep=1)
            decoder = GraphDecoder(model, cache, graphs=False)
            if static:
                decoder.start(4)
            cache.set_view(view)
            if static:
                logits.append(decoder.step(ids[:, 40], torch.tensor([40])).clone())
            else:
                logits.append(forward_unseen(model, cache, ids, None, keep=1)[:, 0])
            cache.set_view(None)
            decoder.stop()
    dense = lc.LongCtxCache(model)
    with torch.no_grad():
        full = forward_unseen(model, dense, ids, None, keep=1)[:, 0]
    assert not torch.allclose(logits[0], full, atol=1e-4)  # the view really differs from the whole cache
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-4)


def test_graphs_are_refused_for_a_draft_model_and_an_evicting_cache():
    with pytest.raises(ValueError, match="`cuda_graphs` is supported with draft='self' only"):
        lc.Speculative(draft=tiny_model("llama", seed=5), cuda_graphs=True)
    with pytest.raises(ValueError, match="`cuda_graphs` must be True or False"):
        lc.Speculative(cuda_graphs="yes")
    model = lc.patch(tiny_model("llama"), kv="streaming:budget=24")
    spec = lc.Speculative(draft="self", draft_kv=VIEW, cuda_graphs=True)
    with pytest.raises(ValueError, match="`cuda_graphs` needs a LongCtxCache without eviction"):
        model.generate(random_ids(1, 30), max_new_tokens=4, custom_generate=lc.speculative_generate,
                       speculative=spec)
    assert "cuda_graphs" not in lc.config.feature_to_dict(lc.Speculative())  # the default is not written
    assert parse_feature("speculative", lc.config.feature_to_dict(spec)) == spec


def cuda_reference_target():
    """The reference target in float32 on the GPU, running ``longctx_kv``."""
    model = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-target-20m", dtype=torch.float32).cuda().eval()
    model.set_attn_implementation("longctx_kv")
    return model


def instances_started(monkeypatch, cls) -> list:
    """The instances of ``cls`` whose ``start`` runs, in order."""
    started = []
    start = cls.start
    monkeypatch.setattr(cls, "start", lambda self, *a, **k: (started.append(self), start(self, *a, **k))[1])
    return started


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_self_speculation_equals_eager_on_the_gpu(monkeypatch):
    """fp32 reference target on the GPU: self-speculation with graphed draft steps gives plain generate's tokens,
    token by token, as does the same speculation with eager draft steps; the graph is captured once per call and
    replayed for the other draft steps."""
    model, decoders = cuda_reference_target(), instances_started(monkeypatch, GraphDecoder)
    for batch in (1, 4):
        ids, mask = left_padded(batch, 600, 8192)
        kwargs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32, min_new_tokens=32,
                      do_sample=False)
        expected = model.generate(**kwargs, past_key_values=lc.LongCtxCache(model))
        outs = []
        for graphs in (True, False):
            spec = lc.Speculative(draft="self", draft_kv="streaming:256", num_draft_tokens=4, cuda_graphs=graphs)
            outs.append(model.generate(**kwargs, past_key_values=lc.LongCtxCache(model, cuda_graphs=True),
                                       custom_generate=lc.speculative_generate, speculative=spec))
        assert torch.equal(outs[0], expected) and torch.equal(outs[1], expected), batch
        graphed = decoders[-1]
        assert graphed.captures >= 1 and graphed.replays > graphed.captures, (batch, graphed.replays)


class _Streamer:
    """A streamer (it makes ``Sequences.append`` take its column-by-column loop) that records nothing."""

    def put(self, tokens):
        pass


@pytest.mark.parametrize("seed", range(4))
def test_append_without_syncs_matches_the_column_loop(seed):
    """``Sequences.append`` for max-length / EOS criteria (vectorised) against its column loop: rounds of random
    columns with holes, EOS tokens and a max length reached mid-round."""
    from transformers.generation import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    g = torch.Generator().manual_seed(seed)
    stopping = StoppingCriteriaList([MaxLengthCriteria(max_length=14), EosTokenCriteria(eos_token_id=3)])
    ids = torch.randint(4, 9, (5, 6), generator=g)
    fast, loop = Sequences(ids, None), Sequences(ids, None)
    active_fast = torch.ones(5, dtype=torch.bool)
    active_loop = active_fast.clone()
    for _ in range(4):
        columns = torch.randint(0, 9, (5, 4), generator=g)
        holes = torch.rand(5, 4, generator=g) < 0.3
        holes[:, -1] = False  # the round's last token is never a hole
        fast.append(columns, holes, active_fast, stopping)
        loop.append(columns, holes, active_loop, stopping, _Streamer())
        assert torch.equal(fast.member, loop.member) and torch.equal(fast.counts, loop.counts)
        assert torch.equal(active_fast, active_loop)
    assert not active_loop.all() and torch.equal(fast.output(torch.tensor(0)), loop.output(torch.tensor(0)))


# ------------------------------------------------------------- graph-captured rounds (rounds.StaticRounds)
def count_static_rounds(monkeypatch):
    """Record (draft length, the round's status) of every ``StaticRounds.run``."""
    from hf_longctx.speculative.rounds import StaticRounds

    calls = []
    run = StaticRounds.run
    monkeypatch.setattr(StaticRounds, "run", lambda self, drafts: (lambda status: (
        calls.append((drafts, status)), status)[1])(run(self, drafts)))
    return calls


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
def test_static_rounds_equal_generate(family, monkeypatch):
    """Rounds on static buffers (run eagerly on CPU, the code a CUDA graph captures): greedy tokens are plain
    generate's, batch 1 and 4 left-padded, fixed and adaptive lengths; drafts are accepted (the rounds emit more
    tokens than there are rounds) and the cache leaves static decoding."""
    model, calls = tiny_model(family), count_static_rounds(monkeypatch)
    for batch in (1, 4):
        ids, mask = left_padded(batch, 24, 96)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        expected = model.generate(**kwargs)
        for drafts in (3, "adaptive"):
            calls.clear()
            spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens=drafts, cuda_graphs=True)
            out = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec,
                                 return_dict_in_generate=True)
            assert torch.equal(out.sequences, expected), (batch, drafts)
            assert calls and not any(layer.static or layer.block for layer in out.past_key_values.layers)
            if drafts == 3:
                accepted = sum(status.accepted for _, status in calls)
                assert accepted > 0 and len(calls) < 23, (accepted, len(calls))
            for length, status in calls:  # per draft position: rows that accepted at least that many drafts
                assert len(status.reached) == length and status.rows >= max(status.reached, default=0)
                assert status.reached == sorted(status.reached, reverse=True)
            if batch == 1:  # the prefill's token, then each round's accepted drafts and its own token (the last cut)
                emitted = [1 + sum(status.accepted + 1 for _, status in calls[:n]) for n in range(len(calls) + 1)]
                assert emitted[-2] < 24 <= emitted[-1], emitted


def test_static_rounds_switched_off_are_plain_steps(monkeypatch):
    """Adaptive rounds that settle on G = 0 (forced here) are plain static steps: generate's tokens, no block."""
    from hf_longctx.cache import LongCtxLayer
    from hf_longctx.speculative import DraftLength

    monkeypatch.setattr(DraftLength, "next", lambda self: 0)
    blocks = []
    begin = LongCtxLayer.begin_block
    monkeypatch.setattr(LongCtxLayer, "begin_block", lambda self, n: (blocks.append(n), begin(self, n))[1])
    model, calls = tiny_model("llama"), count_static_rounds(monkeypatch)
    ids, mask = left_padded(4, 24, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens="adaptive", cuda_graphs=True)
    got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
    assert torch.equal(got, model.generate(**kwargs)) and len(calls) == 11 and not blocks


def test_static_rounds_stop_at_eos_per_row(monkeypatch):
    """Rows that reach EOS at different rounds stop there (padded afterwards), as plain generate's do."""
    model, calls = tiny_model("llama"), count_static_rounds(monkeypatch)
    ids, mask = left_padded(4, 24, 96)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    eos = int(free[0, 24 + 5])  # a token row 0 emits mid-way: as EOS it stops that row early
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                  pad_token_id=1)
    expected = model.generate(**kwargs)
    spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens=4, cuda_graphs=True)
    got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
    assert calls and torch.equal(got, expected)
    assert (expected[0, 24 + 6:] == 1).all()  # row 0 really stopped early


def test_static_rounds_sampling_two_sample_test(monkeypatch):
    """Sampling in the rounds (drafts drawn by the exponential race, ``sample_accept``) keeps the target's
    distribution of the first drafted token; the wrong rule, resampling from p after a rejection, does not."""
    from hf_longctx.speculative import rounds

    model, calls = sharp_tiny(0), count_static_rounds(monkeypatch)
    prompt = torch.randint(0, 8, (1, 40), generator=torch.Generator().manual_seed(4))
    ids = prompt.expand(4000, -1)
    spec = lc.Speculative(draft="self", draft_kv="streaming:budget=2,sink_tokens=1", num_draft_tokens=2,
                          cuda_graphs=True)

    def distribution(generate, seed):
        torch.manual_seed(seed)
        out = generate(input_ids=ids, max_new_tokens=3, do_sample=True, top_k=None, pad_token_id=0,
                       eos_token_id=None)
        return torch.bincount(out[:, 41], minlength=8).float() / ids.shape[0]

    ours = lambda **kw: model.generate(**kw, custom_generate=lc.speculative_generate, speculative=spec)  # noqa: E731
    expected = distribution(model.generate, 1)
    got = distribution(ours, 2)
    assert calls
    monkeypatch.setattr(rounds, "sample_accept", resample_from_p)
    wrong = distribution(ours, 2)
    total_variation = lambda dist: 0.5 * (dist - expected).abs().sum().item()  # noqa: E731
    assert total_variation(got) < 0.05 and total_variation(wrong) > 0.1, (total_variation(got), total_variation(wrong))


def test_rounds_fall_back_to_eager_rounds_and_say_why(monkeypatch, caplog):
    """A logits processor that reads the ids (min_new_tokens) cannot be captured: the eager rounds run, tokens are
    still generate's, and a warning names the processor."""
    from transformers.utils import logging as hf_logging

    model, calls = tiny_model("llama"), count_static_rounds(monkeypatch)
    ids, mask = left_padded(2, 24, 96)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    spec = lc.Speculative(draft="self", draft_kv=VIEW, num_draft_tokens=2, cuda_graphs=True)
    hf_logging.warning_once.cache_clear()  # an earlier test may have said it already
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            got = model.generate(**kwargs, custom_generate=lc.speculative_generate, speculative=spec)
    finally:
        hf_logging.disable_propagation()
    assert torch.equal(got, model.generate(**kwargs)) and not calls
    assert "the logits processor MinLengthLogitsProcessor reads the ids" in caplog.text


def test_draft_length_runs_the_best_modelled_length():
    """DraftLength: the start length, then G = 0, then the length maximising E(G) / t(G) from the pooled
    acceptance and the timed costs (untimed lengths interpolated, then timed once chosen); rounds that warm up or
    capture are not timed; speculation goes off where no length beats plain steps."""
    from hf_longctx.speculative import DraftLength

    def run(acceptance, seconds, rounds=80, rows=1000):
        rule, chosen, seen = DraftLength(8, start=3, warmup=2), [], {}
        for _ in range(rounds):
            drafts = rule.next()
            chosen.append(drafts)
            seen[drafts] = seen.get(drafts, 0) + 1
            steady = seen[drafts] > 2  # the first two rounds of a length: an eager warm-up and a capture
            reached = [round(rows * acceptance ** j) for j in range(1, drafts + 1)]
            rule.record(drafts, seconds[drafts] if steady else 100.0, rows, reached, steady)
        return chosen, rule

    def rate(acceptance, seconds, drafts):
        return sum(acceptance ** j for j in range(drafts + 1)) / seconds[drafts]

    def best(acceptance, seconds):
        return max(range(9), key=lambda g: rate(acceptance, seconds, g))

    # G = 1 is cheap: the cost line through G = 3 and 0 underrates it; timed, it wins
    seconds = {g: {0: 1.0, 1: 1.2}.get(g, 1.0 + 0.7 * g) for g in range(9)}
    chosen, rule = run(0.8, seconds)
    assert chosen[:4] == [3] * 4 and chosen[4:8] == [0] * 4 and chosen[8:12] == [1] * 4
    assert set(chosen[12:]) == {1} == {best(0.8, seconds)}
    assert rule.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.64, abs=1e-3)
    assert rule.cost(2) == pytest.approx((1.2 + 3.1) / 2)  # untimed: between the timed neighbours
    # cheap drafts: longer lengths pay; each is timed before it is kept, and the one kept is within 1% of the best
    # (the line through timed lengths overrates a convex cost's middle: here it stops at G = 4 of the best 5)
    cheap = {g: 1.0 + 0.02 * g * g for g in range(9)}
    chosen, rule = run(0.9, cheap)
    assert chosen[-1] > 3 and rule.timed(chosen[-1]) and set(chosen[-10:]) == {chosen[-1]}
    assert rate(0.9, cheap, chosen[-1]) > 0.99 * rate(0.9, cheap, best(0.9, cheap))
    # drafts as dear as a step and rarely accepted: plain steps
    chosen, _ = run(0.1, {g: 1.0 + g for g in range(9)})
    assert set(chosen[8:]) == {0}
    # batch 1: a poor start does not switch speculation off before min_trials rounds have drafted
    rule, chosen = DraftLength(8, start=3, warmup=2, min_trials=16), []
    for round_ in range(60):
        drafts = rule.next()
        chosen.append(drafts)
        accepted = 0 if round_ < 8 else drafts  # nothing accepted at first, then every draft
        rule.record(drafts, 1.0 + 0.5 * drafts, 1, [1] * accepted + [0] * (drafts - accepted), True)
    assert 0 in chosen and chosen[-1] == 8
    with pytest.raises(ValueError, match="`longest` must be an integer >= 1"):
        DraftLength(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_rounds_on_the_gpu_equal_generate(monkeypatch):
    """fp32 reference target on the GPU: graph-captured rounds give plain generate's tokens, batch 1 and 4
    left-padded, fixed and adaptive lengths; graphs are captured and replayed."""
    from hf_longctx.speculative.rounds import StaticRounds

    model, states = cuda_reference_target(), instances_started(monkeypatch, StaticRounds)
    for batch in (1, 4):
        ids, mask = left_padded(batch, 600, 8192)
        kwargs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=48, do_sample=False)
        expected = model.generate(**kwargs, past_key_values=lc.LongCtxCache(model))
        for drafts in (4, "adaptive"):
            spec = lc.Speculative(draft="self", draft_kv="streaming:256", num_draft_tokens=drafts, cuda_graphs=True)
            got = model.generate(**kwargs, past_key_values=lc.LongCtxCache(model, cuda_graphs=True),
                                 custom_generate=lc.speculative_generate, speculative=spec)
            assert torch.equal(got, expected), (batch, drafts)
            assert states[-1].captures >= 1 and states[-1].replays > 0, (batch, drafts, states[-1].replays)
