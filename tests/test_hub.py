"""Model cards rendered from eval results, saved offline into temporary folders."""

import argparse
import json

import pytest
from huggingface_hub import HfApi, ModelCard
from test_eval import save_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from hf_longctx.eval import PerplexityResult, RetrievalResult, save_result
from hf_longctx.eval.command import add_eval_arguments
from hf_longctx.hub import push_card_to_hub, render_card, save_card
from hf_longctx.hub.command import add_card_arguments

LONGCTX = {"attention": {"type": "sink", "sink_tokens": 4, "window": 256}}
CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def results(command_prefix="hf-longctx eval my-model --output my-model/eval"):
    ppl = PerplexityResult(
        model_name="my-model",
        lengths=[512, 1024],
        nll=[1.5, 1.75],
        perplexity=[4.4817, 5.7546],
        num_samples=4,
        training_length=512,
        dataset="hf-longctx held-out Python sources (validation split)",
        command=f"{command_prefix} --task ppl --lengths 512,1024",
        metadata={"device": "NVIDIA H100", "dtype": "bfloat16", "longctx": LONGCTX, "versions": {"torch": "2.11"}},
    )
    grid = dict(
        model_name="my-model",
        lengths=[512, 1024],
        depths=[0.0, 1.0],
        accuracy=[[1.0, 0.8], [0.6, 0.2]],
        prompt_tokens=[[510.0, 511.0], [1020.0, 1021.0]],
        num_samples=5,
        training_length=512,
    )
    passkey = RetrievalResult(task="passkey", command=f"{command_prefix} --task passkey --seed 0", **grid)
    needle = RetrievalResult(task="needle", command=f"{command_prefix} --task needle --seed 1", **grid)
    return [ppl, passkey, needle]


@pytest.fixture
def model_dir(tmp_path):
    """A checkpoint folder with config.json (carrying a longctx patch) and three eval results in eval/."""
    folder = tmp_path / "my-model"
    CONFIG.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "longctx": LONGCTX}))
    for result in results():
        save_result(result, folder / "eval")
    return folder


def test_card_holds_the_numbers_and_commands_of_the_results(model_dir):
    card = render_card(model_dir, base_model="org/base", extra_tags=["llama"], license="apache-2.0")
    data = card.data
    assert data.library_name == "transformers" and data.base_model == "org/base" and data.license == "apache-2.0"
    assert data.tags == ["hf-longctx", "long-context", "llama"]

    ppl, passkey, needle = results()
    index = {(r.task_name, r.dataset_config): r.metric_value for r in data.eval_results}
    assert index == {
        ("Perplexity vs context length", "512-tokens"): 4.4817,
        ("Perplexity vs context length", "1024-tokens"): 5.7546,
        ("Passkey retrieval", "512-tokens"): 0.9,
        ("Passkey retrieval", "1024-tokens"): 0.4,
        ("Needle in a haystack", "512-tokens"): 0.9,
        ("Needle in a haystack", "1024-tokens"): 0.4,
    }
    text = card.text
    for result in (ppl, passkey, needle):
        assert result.to_markdown() in text
        assert f"```bash\n{result.command}\n```" in text
        assert f"({'eval/' + result.task}.png)" in text
    assert text.index("Perplexity vs context length") < text.index("Passkey retrieval") < text.index("Needle in a")
    assert json.dumps(LONGCTX, indent=2) in text
    parameters = sum(p.numel() for p in LlamaForCausalLM(CONFIG).parameters())
    assert f"| parameters | {parameters:,} |" in text and "| training length (max_position_embeddings) | 512 |" in text
    assert "NVIDIA H100, bfloat16, torch 2.11" in text


def test_saved_card_round_trips(model_dir):
    card = render_card(model_dir)
    path = save_card(card, model_dir)
    assert path == model_dir / "README.md"
    loaded = ModelCard.load(path)
    assert loaded.data.eval_results == card.data.eval_results
    assert loaded.data.model_name == "my-model" and loaded.text == card.text


def test_card_without_results_says_how_to_make_them(tmp_path):
    CONFIG.save_pretrained(tmp_path / "bare")
    card = render_card(tmp_path / "bare")
    assert card.data.eval_results is None and "No evaluation results yet" in card.text
    assert "No hf-longctx patch is saved" in card.text


def test_card_refuses_unreproducible_or_misplaced_results(model_dir, tmp_path):
    with pytest.raises(ValueError, match="^model_dir:"):
        render_card(tmp_path / "missing")
    outside = tmp_path / "elsewhere"
    save_result(results()[0], outside)
    with pytest.raises(ValueError, match="^eval_dirs:.*outside the model folder"):
        render_card(model_dir, eval_dirs=[outside])
    with pytest.raises(ValueError, match="^eval_dirs:.*not a folder"):
        render_card(model_dir, eval_dirs=[model_dir / "nope"])
    without_command = results()[0]
    without_command.command = None
    save_result(without_command, model_dir / "eval")
    with pytest.raises(ValueError, match="^eval_dirs:.*records no command"):
        render_card(model_dir)


def test_push_uploads_card_and_results_only(model_dir, monkeypatch):
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs
        return type("Commit", (), {"commit_url": "https://hf.co/org/m/commit/1"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    with pytest.raises(ValueError, match="^model_dir:.*README.md"):
        push_card_to_hub(model_dir, "org/m")
    save_card(render_card(model_dir), model_dir)
    assert push_card_to_hub(model_dir, "org/m", token="t") == "https://hf.co/org/m/commit/1"
    assert calls["create"] == ("org/m", {"exist_ok": True})
    upload = calls["upload"]
    assert upload["repo_id"] == "org/m" and upload["folder_path"] == model_dir.resolve()
    assert upload["allow_patterns"] == ["README.md", "eval/*"]


def test_eval_then_card_commands(tmp_path, monkeypatch):
    """The CLI end to end: every number on the card is the JSON's, with the command that made it."""
    checkpoint = save_checkpoint(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="hf-longctx")
    subparsers = parser.add_subparsers(required=True)
    add_eval_arguments(subparsers)
    add_card_arguments(subparsers)
    argv = ["eval", "tiny", "--output", "tiny/eval", "--task", "ppl", "--lengths", "32,64", "--device", "cpu"]
    args = parser.parse_args(argv)
    args.func(args)
    args = parser.parse_args(["card", "tiny", "--tag", "test"])
    assert args.func(args).resolve() == (checkpoint / "README.md").resolve()

    card = ModelCard.load(checkpoint / "README.md")
    ppl = json.loads((checkpoint / "eval" / "ppl.json").read_text())
    assert [r.metric_value for r in card.data.eval_results] == ppl["perplexity"]
    assert ppl["command"] == "hf-longctx eval tiny --output tiny/eval --task ppl --lengths 32,64 --samples 4 " + (
        "--batch-size 1 --max-tokens 131072 --device cpu --dtype auto"
    )
    assert ppl["command"] in card.text and "(eval/ppl.png)" in card.text
    assert all(f"{value:.3f}" in card.text for value in ppl["perplexity"])


def test_card_shows_the_training_log_and_its_command(model_dir):
    log = {"steps": 3829, "tokens_seen": 125468672, "eval_loss": 2.0248713, "device": "NVIDIA H100 80GB HBM3"}
    log["command"] = "recipes/pretrain.py --model target --output my-model"
    (model_dir / "loss_curve.json").write_text(json.dumps({**log, "log_history": []}))
    text = str(render_card(model_dir))
    assert "## Training" in text
    assert "| optimizer steps | 3,829 |" in text and "| tokens seen | 125,468,672 |" in text
    assert "| final validation loss (nats/token) | 2.025 |" in text
    assert "recipes/pretrain.py --model target --output my-model" in text
