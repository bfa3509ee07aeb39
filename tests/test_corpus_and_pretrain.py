"""The reference models' data and training side: corpus, passkey documents, tokenizer and pretrain recipes.

Everything runs on the CPU in seconds: a fake corpus of generated package sources, a 300-token tokenizer
and a one-layer Llama.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl

from hf_longctx.eval.corpus import Document, iter_documents, line_chunks, split_of
from hf_longctx.eval.passkey import PASSKEY_QUESTION, passkey_text, passkey_training_document, random_passkey

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORDS = "def return self value index import class for in if else None True data result name list".split()


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` (recipes are scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fake_source(rng: random.Random, lines: int) -> str:
    return "".join(f"    {' '.join(rng.choices(WORDS, k=rng.randint(2, 9)))}  # {rng.randint(0, 999)}\n"
                   for _ in range(lines))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A site-packages-like folder: packages ``pkg000..`` (two modules and a test file each), a module
    ``single.py``, and things that are not documents (``__pycache__``, dist-info, a big file, bad UTF-8)."""
    root = tmp_path_factory.mktemp("site")
    rng = random.Random(0)
    names = [f"pkg{i:03d}" for i in range(200)]
    chosen = [n for n in names if split_of(n) == "validation"][:3] + [n for n in names if split_of(n) == "train"][:30]
    for name in chosen:
        (root / name / "tests").mkdir(parents=True)
        (root / name / "__init__.py").write_text(f'"""The {name} package."""\n' + fake_source(rng, 30))
        (root / name / "core.py").write_text(fake_source(rng, 60))
        (root / name / "tests" / "test_core.py").write_text(fake_source(rng, 10))
        (root / name / "__pycache__").mkdir()
        (root / name / "__pycache__" / "core.py").write_text("cached\n")
    (root / "single.py").write_text("x = 1\n")
    (root / "pkg000-1.0.dist-info").mkdir()
    (root / "pkg000-1.0.dist-info" / "meta.py").write_text("not a package\n")
    (root / chosen[-1] / "huge.py").write_text("#" * 1_100_000)
    (root / chosen[-1] / "latin1.py").write_bytes(b"s = '\xe9'\n")
    (root / "hf_longctx").mkdir()
    (root / "hf_longctx" / "__init__.py").write_text("own = True\n")
    return root


def test_split_is_stable_and_about_five_percent():
    names = [f"package_{i}" for i in range(4000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    assert set(splits) == {"train", "validation"}
    assert 0.035 < splits.count("validation") / len(names) < 0.065
    # Fixed values: the split of a name must not change between versions or machines.
    assert split_of("json") == "validation" and split_of("email") == "train"


def test_iter_documents_reads_packages(fake_root):
    train = list(iter_documents("train", roots=[str(fake_root)]))
    validation = list(iter_documents("validation", roots=[str(fake_root)]))
    assert all(isinstance(d, Document) for d in train + validation)
    assert [d.name for d in train] == sorted(d.name for d in train)
    assert len(validation) == 3 and {d.split for d in validation} == {"validation"}
    assert {d.split for d in train} == {"train"} and not {d.name for d in train} & {d.name for d in validation}
    names = {d.name for d in train + validation}
    assert "hf_longctx" not in names and not any("dist" in n for n in names)
    assert "single" in names
    doc = next(d for d in train if d.name.startswith("pkg"))
    headers = [line for line in doc.text.splitlines() if line.startswith("# file: ")]
    assert headers == [f"# file: {doc.name}/__init__.py", f"# file: {doc.name}/core.py",
                       f"# file: {doc.name}/tests/test_core.py"]
    everything = "".join(d.text for d in train + validation)
    assert "cached" not in everything and "#" * 1000 not in everything and "s = '" not in everything


def test_iter_documents_limits(fake_root):
    roots = [str(fake_root)]
    assert len(list(iter_documents("train", roots=roots, max_documents=4))) == 4
    capped = list(iter_documents("train", roots=roots, max_bytes=10_000))
    assert sum(len(d.text.encode()) for d in capped) == 10_000
    assert list(iter_documents("train", roots=roots, min_chars=10**9)) == []
    with pytest.raises(ValueError, match="split must be one of"):
        next(iter_documents("test", roots=roots))
    with pytest.raises(ValueError, match="max_bytes"):
        next(iter_documents("train", roots=roots, max_bytes=-1))


def test_line_chunks_reassemble():
    text = "".join(f"line {i}\n" for i in range(1000)) + "tail without newline"
    chunks = list(line_chunks([text, "", "x\n"], chunk_chars=100))
    assert "".join(chunks) == text + "x\n"
    assert all(c.endswith("\n") for c in chunks[:-2]) and max(map(len, chunks)) < 120


def test_passkey_text_structure():
    prompt, answer = passkey_text(num_filler=10, depth=0.3, passkey=41962)
    assert answer == " 41962" and prompt.endswith("\n" + PASSKEY_QUESTION)
    lines = prompt.split("\n")
    assert lines[1] == "The pass key is 41962. Remember it. 41962 is the pass key."
    assert lines[0].count("The grass is green.") == 3 and lines[2].count("The grass is green.") == 7
    assert passkey_text(0, 0.5, 12345)[0] == ("The pass key is 12345. Remember it. 12345 is the pass key.\n"
                                              + PASSKEY_QUESTION)
    assert passkey_text(4, 0.0, 1)[0].startswith("The pass key is 1.")
    assert passkey_text(4, 1.0, 1)[0].split("\n")[-2].startswith("The pass key is 1.")


@pytest.mark.parametrize("kwargs, name", [(dict(depth=1.5), "depth"), (dict(depth=-0.1), "depth"),
                                          (dict(depth=float("nan")), "depth"), (dict(num_filler=-1), "num_filler")])
def test_passkey_text_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        passkey_text(**{"num_filler": 3, "depth": 0.5, "passkey": 12345, **kwargs})


def test_passkey_documents_are_reproducible():
    keys = [random_passkey(random.Random(s)) for s in range(50)]
    assert all(10_000 <= k <= 99_999 for k in keys)
    doc = passkey_training_document(random.Random(7), 5)
    assert doc == passkey_training_document(random.Random(7), 5) and doc.endswith("\n")
    prompt_end = doc.index(PASSKEY_QUESTION) + len(PASSKEY_QUESTION)
    key = doc[prompt_end:].strip()
    assert f"The pass key is {key}." in doc


def test_schedule_and_time_budget():
    pretrain = load_recipe("pretrain")
    schedule = pretrain.CosineSchedule(warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1) and schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55) and schedule(110) == pytest.approx(0.1) == schedule(500)
    budget = pretrain.TimeBudget(deadline=float("inf"), schedule=schedule)
    control = budget.on_step_end(None, SimpleNamespace(global_step=5), TrainerControl())
    assert not control.should_training_stop
    assert budget.on_step_end(None, SimpleNamespace(global_step=110), TrainerControl()).should_training_stop
    expired = pretrain.TimeBudget(deadline=0.0, schedule=schedule)
    assert expired.on_step_end(None, SimpleNamespace(global_step=1), TrainerControl()).should_training_stop


def test_time_budget_shortens_the_schedule_to_the_deadline(monkeypatch):
    pretrain = load_recipe("pretrain")
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(pretrain.time, "monotonic", lambda: clock.now)
    schedule = pretrain.CosineSchedule(warmup_steps=5, total_steps=1000)
    budget = pretrain.TimeBudget(deadline=10.0, schedule=schedule)
    first, replan_from = pretrain.TIMING_STEPS
    step, stopped = 0, False
    while not stopped:
        step += 1
        clock.now = 0.1 * (step - first)  # 0.1 s per step, so about 100 steps fit before the deadline
        stopped = budget.on_step_end(None, SimpleNamespace(global_step=step), TrainerControl()).should_training_stop
        assert step < replan_from or first + 95 <= schedule.total_steps <= first + 101
    assert first + 95 <= step <= first + 100 and clock.now <= 10.0 + 1e-9
    assert schedule(step) == pytest.approx(pretrain.MIN_LR_RATIO, abs=0.01)


@pytest.fixture(scope="module")
def tiny_tokenizer(fake_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    load_recipe("train_tokenizer").main(["--output", str(folder), "--vocab-size", "300",
                                         "--model-max-length", "128", "--roots", str(fake_root)])
    return folder


def test_tokenizer_and_streams(tiny_tokenizer):
    pretrain = load_recipe("pretrain")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert len(tokenizer) == 300 and tokenizer.model_max_length == 128
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    stream = pretrain.encode_stream(tokenizer, ["def f(x):\n    return x\n" * 50, "é ünïcode\n"])
    assert stream.dtype == torch.int32 and (stream == tokenizer.eos_token_id).sum() == 2
    assert tokenizer.decode(stream.tolist()) == ("def f(x):\n    return x\n" * 50 + "<|endoftext|>"
                                                 + "é ünïcode\n<|endoftext|>")
    ids, lengths = pretrain.passkey_blocks(tokenizer, 5, 128, random.Random(0))
    assert ids.shape == (5, 128) and lengths.shape == (5,) and bool((lengths <= 128).all())
    for row, length in zip(ids, lengths):
        text = tokenizer.decode(row[:length].tolist())
        assert text.endswith("<|endoftext|>") and text.count(PASSKEY_QUESTION) >= 1
        for doc in text.split("<|endoftext|>")[:-1]:
            key = doc.split(PASSKEY_QUESTION)[1].strip()
            assert f"The pass key is {key}." in doc


def test_pretrain_end_to_end(fake_root, tiny_tokenizer, tmp_path):
    output = tmp_path / "model"
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    argv = ["--model", "draft", "--tokenizer", str(tiny_tokenizer), "--output", str(output),
            "--roots", str(fake_root), "--seq-len", "128", "--max-steps", "6", "--batch-size", "2",
            "--warmup-steps", "2", "--logging-steps", "2", "--eval-steps", "3", "--eval-blocks", "2",
            "--num-workers", "0", "--max-minutes", "10", "--token-cache", str(tmp_path / "tokens.pt"),
            "--model-overrides", json.dumps(tiny)]
    load_recipe("pretrain").main(argv)
    run = json.loads((output / "loss_curve.json").read_text())
    assert run["steps"] == 6 and run["name"] == "draft" and run["eval_loss"] is not None
    assert [row["step"] for row in run["log_history"] if "loss" in row] == [1, 2, 4, 6]
    assert all(row["tokens_per_s"] > 0 for row in run["log_history"] if "loss" in row)
    assert (output / "loss_curve.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.dtype == torch.bfloat16 and model.config.max_position_embeddings == 128
    assert model.config.hidden_size == 32 and model.config.tie_word_embeddings
    assert model.config.use_cache and model.config.vocab_size == len(tokenizer) == 300
    assert sum(p.numel() for p in model.parameters()) == run["parameters"]
    ids = tokenizer("def value(self):", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
    # The second run (the draft after the target in the GPU job) reuses the tokenized corpus.
    load_recipe("pretrain").main(argv[:5] + [str(tmp_path / "again")] + argv[6:])
    assert (tmp_path / "again" / "model.safetensors").exists()


def test_model_configs_have_the_documented_sizes():
    pretrain = load_recipe("pretrain")

    class Vocab8192:
        bos_token_id = eos_token_id = pad_token_id = 0

        def __len__(self):
            return 8192

    counts = {}
    for name in ("target", "draft"):
        config = pretrain.model_config(name, Vocab8192(), 1024)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert config.max_position_embeddings == 1024 and config.tie_word_embeddings
        assert config.num_key_value_heads == 2 and config.head_dim == 64
    assert 19e6 < counts["target"] < 22e6 and 2.5e6 < counts["draft"] < 4e6
    with pytest.raises(ValueError, match="model must be one of"):
        pretrain.model_config("huge", Vocab8192(), 1024)
