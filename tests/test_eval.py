"""The evaluation harness on tiny random Llama models with a tiny byte-level BPE tokenizer built here."""

import argparse
import json
import math
import re
import shlex

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_ids, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_longctx.eval import (
    Document,
    PerplexityResult,
    RetrievalResult,
    draft_agreement,
    estimate_memory_bytes,
    needle_grid,
    passkey_accuracy,
    perplexity_vs_length,
    save_result,
)
from hf_longctx.eval import perplexity as perplexity_module
from hf_longctx.eval.command import add_eval_arguments, parse_longctx
from hf_longctx.eval.passkey import FILLER, passkey_text

TRAINING_LENGTH = 64
TEXT = "def add(a, b):\n    return a + b\n# The quick brown fox jumps over the lazy dog.\n"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless decode, any digit) trained on passkey prompts and a line of code; adds BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([passkey_text(4, 0.5, 12345)[0], FILLER, TEXT] * 3, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TRAINING_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def save_checkpoint(path):
    """A tiny Llama and its tokenizer saved in ``path``; returns ``path``."""
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path




@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-longctx")
    add_eval_arguments(parser.add_subparsers(required=True))
    return parser


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_window_nll_matches_full_logits(family, monkeypatch):
    """Chunked NLL (7 positions at a time) equals cross-entropy of the model's own logits; gemma2 soft-caps."""
    monkeypatch.setattr(perplexity_module, "LOGITS_CHUNK", 7)
    model = tiny_model(family)
    ids = random_ids(2, 40)
    with torch.no_grad():
        logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
    torch.testing.assert_close(perplexity_module.window_nll(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_perplexity_matches_manual_windows(model, tokenizer):
    """Windows are [BOS] + contiguous tokens of the documents joined by EOS, one forward pass each."""
    documents = [Document("a", TEXT * 4, "validation"), Document("b", FILLER * 10, "validation")]
    result = perplexity_vs_length(model, tokenizer, [16, 48], documents=documents, num_samples=3, show_progress=False)

    stream = []
    for document in documents:
        stream += tokenizer(document.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for length, ppl in zip([16, 48], result.perplexity):
        nll = []
        for i in range(3):
            ids = torch.tensor([[tokenizer.bos_token_id] + stream[i * 47 : i * 47 + length - 1]])
            with torch.no_grad():
                logits = model(ids).logits
            nll.append(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
        assert ppl == pytest.approx(math.exp(sum(nll) / 3), rel=1e-5)
    assert result.lengths == [16, 48] and result.num_samples == 3 and result.training_length == TRAINING_LENGTH
    assert result.dataset == "caller-supplied documents"
    assert PerplexityResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_perplexity_refuses_logits_it_cannot_chunk(tokenizer):
    """A head the chunked path does not reproduce (here: a softcap the model itself never applies) is refused."""
    model = tiny_llama(len(tokenizer))
    model.config.final_logit_softcapping = 1.0
    with pytest.raises(NotImplementedError, match="'llama'"):
        perplexity_vs_length(model, tokenizer, [16], documents=[Document("a", TEXT * 4, "validation")])


def test_perplexity_of_trained_text_is_lower(tokenizer):
    """A few optimiser steps on the document lower its perplexity; random weights sit near the vocab size."""
    model = tiny_llama(len(tokenizer))
    documents = [Document("a", TEXT * 20, "validation")]
    before = perplexity_vs_length(model, tokenizer, [32], documents=documents, num_samples=2, show_progress=False)
    ids = torch.tensor([tokenizer(TEXT * 3)["input_ids"][:TRAINING_LENGTH]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    after = perplexity_vs_length(model, tokenizer, [32], documents=documents, num_samples=2, show_progress=False)
    assert math.isfinite(after.perplexity[0]) and after.perplexity[0] < before.perplexity[0] / 4


def test_passkey_grid_shape_and_files(model, tokenizer, tmp_path):
    result = passkey_accuracy(model, tokenizer, [48, 96], depths=[0, 0.5, 1], num_samples=2, show_progress=False)
    assert len(result.accuracy) == 2 and all(len(row) == 3 for row in result.accuracy)
    assert all(0.0 <= value <= 1.0 for row in result.accuracy for value in row)
    for length, row in zip(result.lengths, result.prompt_tokens):
        assert all(length - 30 < tokens <= length for tokens in row)

    paths = save_result(result, tmp_path)
    assert {path.name for path in paths.values()} == {"passkey.json", "passkey.md", "passkey.png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert RetrievalResult.from_dict(json.loads(paths["json"].read_text())) == result
    assert paths["md"].read_text().strip() == result.to_markdown()


@pytest.mark.parametrize("answers_right", [True, False])
def test_needle_scores_generated_key(model, tokenizer, tmp_path, monkeypatch, answers_right):
    """A model that answers with the key in its prompt scores 1 in every cell; one that answers wrong, 0."""

    def generate(input_ids, max_new_tokens, **kwargs):
        key = re.search(r"pass key is (\d+)", tokenizer.decode(input_ids[0])).group(1)
        answer = f" {key} is" if answers_right else " 11111"
        new = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    result = needle_grid(model, tokenizer, [40, 80], depths=[0, 0.3, 1], num_samples=2, show_progress=False)
    assert result.accuracy == [[float(answers_right)] * 3] * 2
    heatmap = save_result(result, tmp_path)["png"]
    assert heatmap.name == "needle.png" and heatmap.stat().st_size > 0


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda m, t: perplexity_vs_length(m, t, [0]), "lengths"),
        (lambda m, t: perplexity_vs_length(m, t, [200_000]), "lengths"),
        (lambda m, t: perplexity_vs_length(m, t, [64], max_tokens=32), "lengths"),
        (lambda m, t: perplexity_vs_length(m, t, [64], num_samples=0), "num_samples"),
        (lambda m, t: perplexity_vs_length(m, t, [64], batch_size=0), "batch_size"),
        (lambda m, t: perplexity_vs_length(m, t, [4096], documents=[Document("a", TEXT, "validation")]), "documents"),
        (lambda m, t: passkey_accuracy(m, t, [64], depths=[0.5, 1.5]), "depths"),
        (lambda m, t: passkey_accuracy(m, t, [64], depths=[-0.1]), "depths"),
        (lambda m, t: passkey_accuracy(m, t, [8]), "lengths"),
        (lambda m, t: needle_grid(m, t, [64], num_samples=0), "num_samples"),
    ],
)
def test_bad_arguments_name_the_parameter(model, tokenizer, call, parameter):
    with pytest.raises(ValueError, match=f"^{parameter}:"):
        call(model, tokenizer)


def test_model_without_tokenizer(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path)
    model.name_or_path = str(tmp_path)
    with pytest.raises(ValueError, match="^tokenizer:.*pass tokenizer="):
        passkey_accuracy(model, None, [64])
    model.name_or_path = ""
    with pytest.raises(ValueError, match="^tokenizer:.*pass tokenizer="):
        perplexity_vs_length(model, None, [64])


def test_memory_estimate_counts_kv_activations_and_logits(model, tokenizer):
    # per token: KV 2 * 2 layers * 2 kv heads * 8 head dim + activations 4 * 32 + 2 * 64 = 320 float32
    length = 100
    expected = length * 320 * 4 + length * len(tokenizer) * 4
    assert estimate_memory_bytes(model, length) == expected
    assert estimate_memory_bytes(model, length, batch_size=3) == 3 * expected


def test_parse_longctx():
    assert parse_longctx(["attention=sink:2048,sink_tokens=8", '{"rope": "yarn:4"}']) == {
        "attention": "sink:2048,sink_tokens=8",
        "rope": "yarn:4",
    }
    with pytest.raises(ValueError, match="^--longctx:"):
        parse_longctx(["sink"])
    with pytest.raises(ValueError, match="^--longctx:"):
        parse_longctx(["{not json"])


def test_eval_command_writes_results_and_reproducible_command(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "tiny")
    output = tmp_path / "out"
    argv = ["eval", str(checkpoint), "--output", str(output), "--multiples", "1,2", "--samples", "2"]
    argv += ["--depths", "0,1", "--device", "cpu", "--longctx", "attention=sink:16"]
    args = eval_parser().parse_args(argv)
    results = args.func(args)
    printed = capsys.readouterr().out

    assert [result.task for result in results] == ["ppl", "passkey", "needle"]
    for result in results:
        written = {path.name for path in output.iterdir()}
        assert written >= {f"{result.task}.{suffix}" for suffix in ("json", "md", "png")}
        assert result.to_markdown() in printed
        data = json.loads((output / f"{result.task}.json").read_text())
        assert data["lengths"] == [TRAINING_LENGTH, 2 * TRAINING_LENGTH]
        assert data["metadata"]["longctx"] == {"attention": {"type": "sink", "sink_tokens": 4, "window": 16}}
        assert data["metadata"]["device"] == "cpu"
        assert data["command"].startswith(f"hf-longctx eval {checkpoint} ")

    # The recorded command reproduces its JSON exactly.
    passkey = json.loads((output / "passkey.json").read_text())
    rerun = eval_parser().parse_args(shlex.split(passkey["command"])[1:])
    assert rerun.task == "passkey" and rerun.depths == [0.0, 1.0] and rerun.samples == 2
    rerun.func(rerun)
    assert json.loads((output / "passkey.json").read_text()) == passkey


def test_eval_command_rejects_conflicting_lengths(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["eval", "m", "--output", "o", "--lengths", "64", "--multiples", "1"])
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["eval", "m", "--output", "o", "--lengths", "64,x"])
    assert "--lengths" in capsys.readouterr().err


def test_draft_agreement_against_itself_and_another_model(tokenizer):
    documents = [Document(name="heldout", text=TEXT * 40, split="validation")]
    target = tiny_llama(len(tokenizer))
    same = draft_agreement(target, target, tokenizer, [32, 64], documents=documents, num_samples=2, show_progress=False)
    assert same.agreement == [1.0, 1.0]

    torch.manual_seed(1)
    other = LlamaForCausalLM(target.config).eval()
    result = draft_agreement(other, target, tokenizer, [64], documents=documents, num_samples=2, show_progress=False)
    windows = perplexity_module.heldout_windows(tokenizer, [64], 2, documents)[1][64]
    with torch.no_grad():
        expected = (other(windows).logits.argmax(-1) == target(windows).logits.argmax(-1)).float().mean().item()
    assert result.agreement == [pytest.approx(expected)]
    assert 0 <= expected < 1


def test_agreement_command_records_the_target(tmp_path, monkeypatch):
    draft = save_checkpoint(tmp_path / "draft")
    target = save_checkpoint(tmp_path / "target")
    output = tmp_path / "out"
    argv = ["eval", str(draft), "--task", "agreement", "--target", str(target), "--output", str(output)]
    argv += ["--lengths", "32", "--samples", "1", "--device", "cpu"]
    args = eval_parser().parse_args(argv)
    documents = [Document(name="heldout", text=TEXT * 40, split="validation")]
    monkeypatch.setattr(perplexity_module, "iter_documents", lambda split: iter(documents))
    (result,) = args.func(args)
    assert result.agreement == [1.0]  # same weights (seed 0) in both folders
    assert f"--target {target}" in result.command
    with pytest.raises(ValueError, match="--target"):
        args = eval_parser().parse_args(["eval", str(draft), "--task", "ppl", "--target", str(target), "--output", str(output)])
        args.func(args)


def test_info_reports_every_kernel_module(monkeypatch):
    """`hf-longctx info`: each Triton kernel module by name, unusable without CUDA, and whether QLoRA can load."""
    from hf_longctx import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = cli.kernel_status()
    kernels = {name: state for name, state in status.items() if name.endswith("Triton kernel")}
    assert len(kernels) == len(cli.KERNEL_MODULES) == 4
    assert set(kernels.values()) == {"unusable: no CUDA device"}
    assert status["QLoRA (bitsandbytes)"] in ("usable", "unusable: install hf-longctx[qlora]")
