"""The committed reference models: they load, evaluate on CPU at small lengths, and drive the demo."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import hf_longctx as lc
from hf_longctx.demo import format_table, run_demo
from hf_longctx.eval import passkey_accuracy, perplexity_vs_length
from hf_longctx.eval.agreement import draft_agreement

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "model_cards" / "longctx-target-20m"
DRAFT = ROOT / "model_cards" / "longctx-draft-3m"


@pytest.fixture(scope="module")
def target():
    return lc.from_pretrained(str(TARGET), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TARGET))


def test_folders_are_hub_ready():
    for folder in (TARGET, DRAFT):
        names = {path.name for path in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png"} <= names
        assert sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) < 50 * 2**20
        assert "hf-longctx" in (folder / "README.md").read_text()


def test_target_perplexity_and_passkey_at_its_training_length(target, tokenizer):
    ppl = perplexity_vs_length(target, tokenizer, [256, 512], num_samples=1, show_progress=False)
    assert all(1 < value < 60 for value in ppl.perplexity), ppl.perplexity  # a trained model, not a random one
    passkey = passkey_accuracy(target, tokenizer, [512], depths=[0.5], num_samples=2, show_progress=False)
    assert passkey.mean_accuracy() == [1.0]


def test_draft_agrees_with_the_target_more_than_chance(target, tokenizer):
    draft = lc.from_pretrained(str(DRAFT), dtype=torch.float32).eval()
    result = draft_agreement(draft, target, tokenizer, [256], num_samples=1, show_progress=False)
    assert 0.3 < result.agreement[0] <= 1.0


def test_demo_table_on_the_trained_model():
    rows = run_demo(str(TARGET), multiples=(0.5, 2))
    stock_long, sink_long = rows[1], rows[3]
    assert rows[0].perplexity == pytest.approx(rows[2].perplexity, rel=1e-3)  # the window covers 512 tokens
    assert sink_long.perplexity < stock_long.perplexity  # past the window, sinks + window hold up
    assert "| stock | 2048 | 2 |" in format_table(rows)
