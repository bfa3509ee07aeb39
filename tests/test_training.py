"""hf_longctx.training (presets, Dataset Decomposition batching and its Trainer hook, the E2-LLM collator) and
the training-time shifted sparse attention (``longctx_s2``)."""

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import DataCollatorWithFlattening, TrainingArguments

import hf_longctx as lc
from hf_longctx.attention.s2 import shifted_sparse_attention
from hf_longctx.config import LongCtxConfig, ShiftedSparseAttention
from hf_longctx.kernels import reference
from hf_longctx.rope.augment import E2LLMAugmentation
from hf_longctx.training import (
    BatchSamplerTrainer,
    DecomposedDataset,
    E2LLMCollator,
    LengthBucketBatchSampler,
    decompose,
    longlora_peft_config,
    qlora,
)
from tests.tiny_models import random_ids, tiny_model




def test_longlora_config_trains_adapters_embeddings_and_norms():
    model = get_peft_model(tiny_model("llama"), longlora_peft_config(r=4))
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    for part in ("q_proj.lora_A", "k_proj.lora_B", "v_proj.lora_A", "o_proj.lora_B", "embed_tokens",
                 "input_layernorm", "post_attention_layernorm", "model.norm"):
        assert any(part in name for name in trainable), part
    assert not any("mlp" in name for name in trainable)
    assert lc.training is __import__("hf_longctx.training").training


@pytest.mark.parametrize("bad", [dict(r=0), dict(lora_alpha=0), dict(lora_dropout=1.0)])
def test_longlora_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        longlora_peft_config(**bad)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_without_bitsandbytes_names_the_extra():
    with pytest.raises(ImportError, match=r"hf-longctx\[qlora\]"):
        qlora("any/model")


def test_decompose_follows_binary_expansion():
    assert decompose(13, 8) == [8, 4, 1]
    assert decompose(40, 16) == [16, 16, 8]
    assert decompose(0, 8) == []


def test_decomposed_dataset_keeps_documents_apart():
    documents = [list(range(100, 113)), list(range(200, 240))]
    dataset = DecomposedDataset(documents, min_length=4, max_length=16)
    assert dataset.lengths == [8, 4, 16, 16, 8]  # 13 = 8 + 4 (+ 1 dropped), 40 = 16 + 16 + 8
    assert dataset[1]["input_ids"].tolist() == list(range(108, 112))
    assert dataset[4]["labels"].tolist() == list(range(232, 240))
    with pytest.raises(ValueError, match="min_length"):
        DecomposedDataset(documents, min_length=3, max_length=16)
    with pytest.raises(ValueError, match="min_length"):
        DecomposedDataset(documents, min_length=32, max_length=16)


def test_sampler_batches_have_constant_tokens_and_cover_the_epoch():
    lengths = [4] * 10 + [8] * 9 + [16] * 4
    sampler = LengthBucketBatchSampler(lengths, tokens_per_batch=16, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 // 4 + 9 // 2 + 4
    for batch in batches:
        assert sum(lengths[i] for i in batch) == 16 and len({lengths[i] for i in batch}) == 1
    used = [i for batch in batches for i in batch]
    assert len(used) == len(set(used))
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_sampler_curriculum_orders_buckets():
    lengths = [4] * 40 + [16] * 10
    short_first = LengthBucketBatchSampler(lengths, 16, curriculum={16: 0.0})
    sizes = [len(batch) for batch in short_first]
    assert sizes == [4] * 10 + [1] * 10  # weight 0 holds the long bucket back until the short one runs out
    growing = LengthBucketBatchSampler(lengths, 16, curriculum=lambda progress: {4: 1 - progress, 16: progress})
    assert Counter(len(batch) for batch in growing) == {4: 10, 1: 10}
    with pytest.raises(ValueError, match="curriculum"):
        list(LengthBucketBatchSampler(lengths, 16, curriculum={4: -1.0}))


@pytest.mark.parametrize("lengths, tokens", [([4, 6], 16), ([32], 16), ([4], 12)])
def test_sampler_rejects_bad_lengths(lengths, tokens):
    with pytest.raises(ValueError, match="lengths|tokens_per_batch"):
        LengthBucketBatchSampler(lengths, tokens)


def test_batch_sampler_trainer_trains_on_buckets(tmp_path):
    documents = [random_ids(1, n, seed=n)[0] for n in (40, 24, 56, 16, 32)]
    dataset = DecomposedDataset(documents, min_length=8, max_length=32)
    sampler = LengthBucketBatchSampler(dataset.lengths, tokens_per_batch=32, seed=0)
    seen = []

    model = lc.patch(tiny_model("llama"), attention="sink:4096")
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, learning_rate=1e-3, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = BatchSamplerTrainer(model=model, args=args, train_dataset=dataset, batch_sampler=sampler)
    trainer.train()
    assert len(seen) == len(sampler) == trainer.state.global_step
    assert all(batch * length == 32 for batch, length in seen)
    assert len({length for _, length in seen}) > 1


def test_e2llm_collator_augments_positions():
    augmentation = E2LLMAugmentation(max_position=64, scales=(2.0,))
    collator = E2LLMCollator(augmentation, seed=0)
    features = [{"input_ids": ids, "labels": ids} for ids in random_ids(3, 16)]
    batch = collator(features)
    assert batch["position_ids"].shape == (3, 16) and batch["position_ids"].dtype == torch.float32
    assert bool(batch["attention_mask"].all())
    assert bool((batch["position_ids"].diff(dim=1) > 0).all())
    loss = tiny_model("llama").train()(**batch).loss  # sdpa trains on it
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="position_ids"):
        E2LLMCollator(augmentation, base=lambda f: {"input_ids": random_ids(1, 8), "position_ids": None})(features)


def dense_s2(query, key, value, group: int, sinks: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle: full masked softmax; head h sees its (shifted, for the second half of heads) group and the sinks,
    within its own packed document when ``segments`` (B, S) is given.

    query: (B, H, S, D); key, value: (B, H_kv, S, D). Returns (B, H, S, D). Also the convergence tests' oracle."""
    heads, length, dim = query.shape[1], query.shape[2], query.shape[3]
    key, value = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value))
    i = torch.arange(length, device=query.device)
    outs = []
    for head in range(heads):
        shift = group // 2 if head >= heads // 2 else 0
        same = (i[:, None] + shift) // group == (i[None, :] + shift) // group
        visible = (same | (i[None, :] < sinks)) & (i[None, :] <= i[:, None])
        if segments is not None:
            visible = visible & (segments[:, :, None] == segments[:, None, :])  # (B, S, S)
        scores = (query[:, head] @ key[:, head].transpose(-1, -2) * dim**-0.5).masked_fill(~visible, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ value[:, head])
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("shorthand, sinks", [("s2:8", 0), ("s2_sink:8,3", 3), ("s2_sink:8,6", 6)])
def test_shifted_sparse_attention_matches_masked_softmax(shorthand, sinks):
    feature = LongCtxConfig(attention=shorthand).attention
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 32, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(2, 2, 32, 8, generator=generator, requires_grad=True) for _ in range(2))
    out = shifted_sparse_attention(query, key, value, feature=feature)
    expected = dense_s2(query, key, value, group=8, sinks=sinks)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(out, generator=generator)
    grads = torch.autograd.grad(out, (query, key, value), cotangent)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (query, key, value), cotangent)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_shifted_sparse_attention_keeps_packed_documents_apart():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, 32, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(2, 2, 32, 8, generator=generator, requires_grad=True) for _ in range(2))
    segments = torch.tensor([[0] * 5 + [1] * 14 + [2] * 13, [0] * 20 + [1] * 12])  # documents straddle groups
    out = shifted_sparse_attention(query, key, value, feature=ShiftedSparseAttention(group_size=8),
                                   segment_ids=segments)
    expected = dense_s2(query, key, value, group=8, sinks=0, segments=segments)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(out, generator=generator)
    grads = torch.autograd.grad(out, (query, key, value), cotangent)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (query, key, value), cotangent)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed sequences"):
        shifted_sparse_attention(query, key, value, feature=LongCtxConfig(attention="s2_sink:8,2").attention,
                                 segment_ids=segments)


def previous_s2(query, key, value, *, feature, kv_valid=None, segment_ids=None, s_aux=None, **kwargs):
    """Oracle: the first formulation of ``shifted_sparse_attention`` (each group one row of a padded batch, its
    earlier sinks concatenated in front of its keys), on the PyTorch reference. Shapes as that function."""
    batch, heads, length, _ = query.shape
    kv_heads, group = key.shape[1], feature.group_size or length // 4
    valid = torch.ones(batch, length, dtype=torch.bool) if kv_valid is None else kv_valid.bool()
    halves = []
    for half, shift in ((0, 0), (1, group // 2)):
        q_heads = slice(half * heads // 2, (half + 1) * heads // 2)
        kv = slice(half * kv_heads // 2, (half + 1) * kv_heads // 2)
        q, k, v = (F.pad(x, (0, 0, shift, shift)) for x in (query[:, q_heads], key[:, kv], value[:, kv]))
        rows_valid = F.pad(valid, (shift, shift), value=False)
        segments = None if segment_ids is None else F.pad(segment_ids, (shift, shift), value=-1)
        groups = rows_valid.shape[1] // group

        def split(x):  # (B, h, n * G, D) -> (B * n, h, G, D)
            return x.reshape(batch, x.shape[1], groups, group, x.shape[3]).transpose(1, 2).flatten(0, 1)

        keys, values, rows = split(k), split(v), rows_valid.reshape(batch * groups, group)
        if feature.sink_tokens:
            sinks = slice(shift, shift + min(feature.sink_tokens, length))
            earlier = torch.arange(sinks.start, sinks.stop) // group < torch.arange(groups)[:, None]
            rows = torch.cat([(rows_valid[:, None, sinks] & earlier).flatten(0, 1), rows], dim=1)
            keys = torch.cat([k[:, :, sinks].repeat_interleave(groups, dim=0), keys], dim=2)
            values = torch.cat([v[:, :, sinks].repeat_interleave(groups, dim=0), values], dim=2)
        out = reference.sink_window_attention(
            split(q), keys, values, sink_tokens=0, window=None, kv_valid=rows,
            segment_ids=None if segments is None else segments.reshape(batch * groups, group),
            s_aux=None if s_aux is None else s_aux[q_heads], **kwargs)
        out = out.reshape(batch, groups, out.shape[1], group, -1).transpose(1, 2).flatten(2, 3)
        halves.append(out[:, :, shift : shift + length])
    return torch.cat(halves, dim=1)


# odd cases: left/right padding (a group with no real token), GQA 3:1, sinks reaching past the first (shifted)
# group, learned sinks and softcap, packed documents straddling groups
PREVIOUS_CASES = {
    "padding-left": dict(shorthand="s2_sink:8,3", pad="left"),
    "padding-right-s2": dict(shorthand="s2:8", pad="right"),
    "gqa-many-sinks": dict(shorthand="s2_sink:8,6", kv_heads=2, heads=6),
    "s-aux-softcap": dict(shorthand="s2_sink:4,2", s_aux=True, softcap=5.0, pad="right"),
    "packed": dict(shorthand="s2:8", packed=True),
    "packed-padded-s-aux": dict(shorthand="s2:8", packed=True, pad="right", s_aux=True),
}


def previous_case(case: str, device: str, dtype: torch.dtype):
    """Inputs of ``PREVIOUS_CASES[case]`` (fp32 on the CPU, leaves), the feature, and the results and gradients of
    ``shifted_sparse_attention`` on ``device`` in ``dtype`` and of ``previous_s2`` (fp32, CPU) for one cotangent."""
    options = PREVIOUS_CASES[case]
    feature = LongCtxConfig(attention=options["shorthand"]).attention
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, length = options.get("heads", 4), options.get("kv_heads", 2), 24
    # transformers' layout: q is a (B, H, S, D) view of (B, S, H, D) memory
    query = torch.randn(2, length, heads, 32, generator=generator).transpose(1, 2)
    key, value = (torch.randn(2, kv_heads, length, 32, generator=generator) for _ in range(2))
    kwargs = {"softcap": options["softcap"]} if "softcap" in options else {}
    if options.get("s_aux"):
        kwargs["s_aux"] = torch.randn(heads, generator=generator)
    if "pad" in options:
        real = torch.tensor([length - 11, length - 3])[:, None]  # row 0: 11 padding tokens, two groups of 8
        index = torch.arange(length)
        kwargs["kv_valid"] = index >= length - real if options["pad"] == "left" else index < real
    if options.get("packed"):
        kwargs["segment_ids"] = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [0] * 9 + [1] * 15])
    tensors = [query, key, value] + ([kwargs.pop("s_aux")] if options.get("s_aux") else [])
    cotangent = torch.randn(2, heads, length, 32, generator=generator)
    results = []
    for run, run_device, run_dtype in ((shifted_sparse_attention, device, dtype), (previous_s2, "cpu", torch.float32)):
        inputs = [x.to(run_device, run_dtype).requires_grad_() for x in tensors]
        extra = {name: x.to(run_device) for name, x in kwargs.items() if torch.is_tensor(x)}
        run_kwargs = {**kwargs, **extra, **({"s_aux": inputs[3]} if len(inputs) > 3 else {})}
        out = run(*inputs[:3], feature=feature, **run_kwargs)
        grads = torch.autograd.grad(out, inputs, cotangent.to(run_device, run_dtype))
        results.append([x.float().cpu() for x in (out, *grads)])
    return results


@pytest.mark.parametrize("case", PREVIOUS_CASES)
def test_shifted_sparse_attention_matches_previous_formulation(case):
    """The group-as-segment path (sinks and s_aux merged through the LSE) equals the padded-rows formulation."""
    for result, expected in zip(*previous_case(case, "cpu", torch.float32)):
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("case", PREVIOUS_CASES)
def test_shifted_sparse_attention_matches_previous_formulation_bf16_cuda(case):
    """The Triton path in bf16 (the segment table, or kv_valid / packed ids through the dispatch) against the
    padded-rows formulation in fp32: output and gradients (q, k, v, s_aux)."""
    for result, expected in zip(*previous_case(case, "cuda", torch.bfloat16)):
        error = (result - expected).norm() / expected.norm()
        assert error < 2e-2, f"relative error {error:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("shorthand, sinks, packed", [("s2:64", 0, True), ("s2_sink:64,4", 4, False)])
def test_shifted_sparse_attention_triton_bf16_cuda(shorthand, sinks, packed):
    """The Triton path (forward and backward, bf16) against the fp32 oracle, with packed documents for s2."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 256, 64, generator=generator) for h in (8, 2, 2))
    segments = torch.tensor([[0] * 40 + [1] * 100 + [2] * 116, [0] * 256]) if packed else None
    inputs = [x.cuda().bfloat16().requires_grad_() for x in (q, k, v)]
    out = shifted_sparse_attention(*inputs, feature=LongCtxConfig(attention=shorthand).attention,
                                   segment_ids=None if segments is None else segments.cuda())
    reference = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = dense_s2(*reference, group=64, sinks=sinks, segments=segments)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=2e-2, atol=2e-2)
    cotangent = torch.randn(expected.shape, generator=generator)
    grads = torch.autograd.grad(out, inputs, cotangent.cuda().bfloat16())
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, reference, cotangent)):
        error = (grad.float().cpu() - expected_grad).norm() / expected_grad.norm()
        assert error < 2e-2, f"relative gradient error {error:.3g}"


def test_s2_trains_on_packed_batches():
    """A DataCollatorWithFlattening batch through a model patched with s2: documents do not see each other."""
    documents = [random_ids(1, length, seed=length)[0].tolist() for length in (13, 30, 21)]  # 64 tokens
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in documents])
    model = lc.patch(tiny_model("llama"), attention="s2:16").train()
    loss = model(**packed).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad.abs().sum() > 0
    # the second document (tokens 13..42) shares the group [32, 48) with the third (43..63): changing it leaves the
    # third one's logits as they were when packed, and moves them when the row is read as one sequence
    other = packed["input_ids"].clone()
    other[0, 13:43] = (other[0, 13:43] + 1) % 90 + 3
    third = slice(43, 64)
    torch.testing.assert_close(model(input_ids=other, position_ids=packed["position_ids"]).logits[0, third],
                               model(**packed).logits[0, third])
    unpacked = model(input_ids=packed["input_ids"]).logits[0, third]
    assert not torch.allclose(model(input_ids=other).logits[0, third], unpacked)


def test_shifted_sparse_attention_rejects_bad_lengths():
    query = key = value = torch.zeros(1, 2, 20, 4)
    with pytest.raises(ValueError, match="multiple of `group_size` \\(8\\)"):
        shifted_sparse_attention(query, key, value, feature=ShiftedSparseAttention(group_size=8))
    with pytest.raises(ValueError, match="multiple of 8"):
        shifted_sparse_attention(query, key, value, feature=ShiftedSparseAttention())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        shifted_sparse_attention(query, key[:, :1], value[:, :1], feature=ShiftedSparseAttention(group_size=4))


@pytest.mark.parametrize("bad, match", [("s2:7", "even"), ("s2:8,2", "misplaced"), ("s2:sink_tokens=2", "s2_sink"),
                                        ("s2_sink:8,0", "sink_tokens"), ("s2:window=0", "window")])
def test_s2_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        LongCtxConfig(attention=bad)


def test_s2_trains_sparse_and_infers_dense():
    ids = random_ids(2, 32)
    stock = tiny_model("qwen3")
    model = lc.patch(tiny_model("qwen3"), attention="s2:8")
    assert model.config._attn_implementation == "longctx_s2"
    torch.testing.assert_close(model(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)  # eval: dense
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != pytest.approx(stock(input_ids=ids, labels=ids).loss.item())
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="multiple of `group_size`"):
        model(input_ids=ids[:, :30], labels=ids[:, :30])


def test_s2_sink_infers_with_sink_attention():
    ids = random_ids(1, 40)
    model = lc.patch(tiny_model("llama"), attention="s2_sink:group_size=8,sink_tokens=2,window=16")
    expected = lc.patch(tiny_model("llama"), attention="sink:16,2")(ids).logits
    torch.testing.assert_close(model(ids).logits, expected)


def test_extend_context_recipe_full_finetune(tmp_path):
    """recipes/extend_context.py end to end on the CPU: s2_sink + linear RoPE, full fine-tuning, passkey blocks;
    it writes a bf16 model that re-applies its patch, the loss curve and the card."""
    from tests.test_corpus_and_pretrain import load_recipe

    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    load_recipe("pretrain")  # extend_context imports it from the recipes folder
    load_recipe("extend_context").main([
        "--model", str(root / "model_cards/longctx-target-20m"), "--output", str(out), "--seq-len", "128",
        "--rope", "linear:2", "--attention", "s2_sink", "--full-finetune", "--no-gradient-checkpointing",
        "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1",
        "--roots", str(root / "hf_longctx" / "training"), "--passkey-fraction", "0.3"])
    curve = json.loads((out / "loss_curve.json").read_text())
    losses = [row["loss"] for row in curve["log_history"] if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert curve["passkey_blocks"] > 0 and "full fine-tuning" in curve["description"]
    assert "tokens_per_s" in curve["log_history"][0]
    config = json.loads((out / "config.json").read_text())
    assert config["longctx"]["attention"]["type"] == "s2_sink" and config["dtype"] == "bfloat16"
    assert "s2_sink" in (out / "README.md").read_text()
    assert not (out / "adapter").exists()


def test_extend_context_rejects_full_finetune_with_qlora(capsys):
    from tests.test_corpus_and_pretrain import load_recipe

    load_recipe("pretrain")
    with pytest.raises(SystemExit):
        load_recipe("extend_context").parse_args(["--model", "m", "--output", "o", "--seq-len", "64",
                                                  "--full-finetune", "--qlora"])
    assert "--full-finetune and --qlora" in capsys.readouterr().err


def test_enable_activation_checkpointing_turns_it_on():
    """The helper the recipes use: transformers' new name where it exists, the deprecated one before it."""
    model = tiny_model("llama")
    lc.training.enable_activation_checkpointing(model)
    new_name = hasattr(type(model), "is_activation_checkpointing")
    assert (model.is_activation_checkpointing if new_name else model.is_gradient_checkpointing)
