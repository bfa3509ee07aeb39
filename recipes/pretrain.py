"""Pretrain one of the project's reference models (a small Llama) from scratch on the local Python corpus.

    PYTHONPATH=. accelerate launch --num_processes 1 --mixed_precision bf16 recipes/pretrain.py \\
        --model target --tokenizer build/tokenizer --output model_cards/longctx-target-20m --max-minutes 5.5

Data: the train split of `hf_longctx.eval.corpus` (documents joined with EOS between them, cut into
blocks of `--seq-len` tokens), plus `--passkey-fraction` of the blocks holding synthetic passkey documents
(`hf_longctx.eval.passkey`), so that the models know the retrieval task the long-context evaluation asks
of them. The validation split gives the eval loss.

Training: HF `Trainer`, AdamW, linear warmup then cosine decay to 10% of the peak LR; bf16 autocast on
CUDA, fp32 on CPU; SDPA attention. With `--max-minutes`, the wall clock counted from this process's start
caps the run: from the measured step time, the cosine schedule is shortened to end at the deadline (less
`SAVE_RESERVE_S` for the export), and training stops there.

Output folder: the model in bf16 safetensors with its config, the tokenizer, ``loss_curve.json`` (the
Trainer's log history plus the run's facts) and ``loss_curve.png``.
"""

import time

_START = time.monotonic()  # before the heavy imports: --max-minutes counts from here

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from hf_longctx.eval import corpus  # noqa: E402
from hf_longctx.eval.passkey import passkey_training_document  # noqa: E402

MODEL_SHAPES = {
    # 6 layers x 2.72 M + tied embedding 8192 x 512 = 4.19 M  ->  20.5 M parameters
    "target": dict(hidden_size=512, intermediate_size=1344, num_hidden_layers=6,
                   num_attention_heads=8, num_key_value_heads=2),
    # 2 layers x 0.69 M + tied embedding 8192 x 256 = 2.10 M  ->  3.5 M parameters
    "draft": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}
DEFAULT_LR = {"target": 1.5e-3, "draft": 3e-3}
DEFAULT_BATCH_SIZE = {"target": 32, "draft": 64}
MIN_LR_RATIO = 0.1
SAVE_RESERVE_S = 20.0
"""Seconds kept free at the end of a `--max-minutes` run for the final eval, the export and the plot."""
TIMING_STEPS = (10, 30)
"""`TimeBudget` times steps from the first global step (after CUDA and data-loader start-up) and re-plans
the schedule at every step from the second on."""


def model_config(name: str, tokenizer, seq_len: int, overrides: dict | None = None) -> LlamaConfig:
    """The Llama config of reference model `name` ("target" or "draft") for `tokenizer`.

    `max_position_embeddings` is `seq_len`, the training length; RoPE theta 10000; tied embeddings.
    `overrides` replaces any config field (the tests build tiny models with it).
    """
    if name not in MODEL_SHAPES:
        raise ValueError(f"model must be one of {sorted(MODEL_SHAPES)}, got {name!r}")
    fields = dict(
        MODEL_SHAPES[name],
        vocab_size=len(tokenizer),
        max_position_embeddings=seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides or {})
    return LlamaConfig(**fields)


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of `texts`, each followed by EOS, concatenated: int32 tensor of shape (total_tokens,).

    All texts are cut into line chunks and encoded in one call of the Rust backend's parallel batch
    encoder (no offsets or attention masks are built), so even a few long documents use every core.
    """
    chunks, ends = [], []
    for text in texts:
        chunks.extend(corpus.line_chunks([text]))
        ends.append(len(chunks))
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(chunks, add_special_tokens=False)
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    pieces, start = [], 0
    for end in ends:
        pieces.extend(torch.tensor(e.ids, dtype=torch.int32) for e in encodings[start:end])
        pieces.append(eos)
        start = end
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def corpus_streams(tokenizer, roots: list[str] | None, max_train_bytes: int | None,
                   eval_bytes: int, cache_path: str | None) -> dict[str, torch.Tensor]:
    """Token streams (int32, shape (tokens,)) of the corpus's "train" and "validation" splits.

    The validation split is read up to `eval_bytes` bytes of text. With `cache_path`, the streams are
    loaded from there when the file was built with the same tokenizer and corpus settings, and saved there
    otherwise (the draft model's run reuses the target run's tokens).
    """
    settings = json.dumps([tokenizer.backend_tokenizer.to_str(), roots, max_train_bytes, eval_bytes,
                           corpus.MAX_FILE_BYTES, corpus.MAX_DOCUMENT_CHARS, corpus.VALIDATION_FRACTION])
    key = hashlib.sha256(settings.encode("utf-8")).hexdigest()
    if cache_path and os.path.exists(cache_path):
        cached = torch.load(cache_path, weights_only=True)
        if cached["key"] == key:
            print(f"tokens: loaded from {cache_path}")
            return {split: cached[split] for split in corpus.SPLITS}
    start = time.monotonic()
    texts = {
        "train": [doc.text for doc in corpus.iter_documents("train", roots, max_bytes=max_train_bytes)],
        "validation": [doc.text for doc in corpus.iter_documents("validation", roots, max_bytes=eval_bytes)],
    }
    read_s = time.monotonic() - start
    streams = {split: encode_stream(tokenizer, texts[split]) for split in corpus.SPLITS}
    chars = sum(map(len, texts["train"]))
    encode_s = time.monotonic() - start - read_s
    print(f"tokens: {len(texts['train'])} train documents, {chars / 1e6:.1f} M chars -> "
          f"{len(streams['train']) / 1e6:.2f} M tokens ({chars / max(1, len(streams['train'])):.2f} chars/token); "
          f"read {read_s:.1f} s, encoded in {encode_s:.1f} s ({chars / 1e6 / max(encode_s, 1e-9):.1f} M chars/s); "
          f"validation {len(streams['validation'])} tokens")
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        partial = f"{cache_path}.{os.getpid()}"
        torch.save({"key": key, **streams}, partial)
        os.replace(partial, cache_path)  # atomic: concurrent runs never read a half-written file
    return streams


def passkey_blocks(tokenizer, num_blocks: int, seq_len: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_blocks` blocks of passkey training documents, each document followed by EOS.

    Half of the documents nearly fill a block on their own (from half to all of the filler that fits),
    the other half are shorter and several share a block. Documents never straddle blocks.

    Returns:
        ``(ids, lengths)``: int32 ids of shape (num_blocks, seq_len), padded with EOS after the last
        document, and int64 lengths of shape (num_blocks,), the tokens before the padding.
    """
    def count(num_filler: int) -> int:
        return len(tokenizer.backend_tokenizer.encode(
            passkey_training_document(random.Random(0), num_filler), add_special_tokens=False).ids) + 1

    base, per_filler = count(0), (count(8) - count(0)) / 8
    if base + 8 > seq_len:
        raise ValueError(f"seq_len must exceed {base + 8} tokens to hold a passkey document, got {seq_len}")
    max_filler = int((seq_len - base - 8) / per_filler)
    eos = tokenizer.eos_token_id
    ids = torch.full((num_blocks, seq_len), eos, dtype=torch.int32)
    lengths = torch.zeros(num_blocks, dtype=torch.int64)
    block, used = 0, 0
    while block < num_blocks:
        sizes = [rng.randint(max_filler // 2, max_filler) if rng.random() < 0.5 else rng.randint(0, max_filler // 2)
                 for _ in range(2 * (num_blocks - block) + 1)]
        texts = [passkey_training_document(rng, size) for size in sizes]
        for encoding in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False):
            doc = encoding.ids + [eos]
            if len(doc) > seq_len:
                continue
            if used + len(doc) > seq_len:
                lengths[block] = used
                block, used = block + 1, 0
                if block == num_blocks:
                    break
            ids[block, used : used + len(doc)] = torch.tensor(doc, dtype=torch.int32)
            used += len(doc)
    return ids, lengths


class BlockDataset(Dataset):
    """Fixed-length language-modelling blocks.

    Args:
        ids: int32 token ids, shape (num_blocks, seq_len).
        lengths: int64, shape (num_blocks,): tokens before the padding; padding positions get label -100.
    """

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor):
        self.ids, self.lengths = ids, lengths

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.ids[index].long()
        labels = input_ids.clone()
        labels[self.lengths[index] :] = -100
        return {"input_ids": input_ids, "labels": labels}


def stream_blocks(stream: torch.Tensor, seq_len: int) -> BlockDataset:
    """Cut a token stream into full blocks of `seq_len` (the remainder is dropped)."""
    ids = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    return BlockDataset(ids, torch.full((ids.shape[0],), seq_len, dtype=torch.int64))


@dataclass
class CosineSchedule:
    """LR multiplier per optimizer step: linear warmup over `warmup_steps`, then a cosine from 1 down to
    `MIN_LR_RATIO` at `total_steps`. `TimeBudget` may shorten `total_steps` during training."""

    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TimeBudget(TrainerCallback):
    """Ends training by a wall-clock deadline (`time.monotonic()` seconds), with the LR schedule finished.

    From global step ``TIMING_STEPS[1]`` on, every step divides the time left by the mean step time
    since ``TIMING_STEPS[0]`` (evaluations and data-loader restarts included) and sets the schedule's
    `total_steps` to the steps that fit, never more than first planned. Training stops at `total_steps`,
    or at the deadline if the steps turn out slower.
    """

    def __init__(self, deadline: float, schedule: CosineSchedule):
        self.deadline, self.schedule, self.max_steps = deadline, schedule, schedule.total_steps
        self.timing_start: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        first, replan_from = TIMING_STEPS
        step, now = state.global_step, time.monotonic()
        if step == first:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.timing_start = time.monotonic()
        elif step >= replan_from and self.timing_start is not None:
            step_s = (now - self.timing_start) / (step - first)
            fit = step + int(0.98 * (self.deadline - now) / step_s)
            self.schedule.total_steps = min(self.max_steps, max(step + 1, fit))
            if step == replan_from:
                print(f"time budget: {step_s * 1e3:.1f} ms/step, schedule ends near step {self.schedule.total_steps}")
        if step >= self.schedule.total_steps or now >= self.deadline:
            control.should_training_stop = True
        return control


class PretrainTrainer(Trainer):
    """`Trainer` with the `CosineSchedule` and a ``tokens_per_s`` entry in each training log."""

    def __init__(self, *args, schedule: CosineSchedule, seq_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.tokens_per_step = seq_len * self.args.train_batch_size * self.args.gradient_accumulation_steps
        self.tokens_per_step *= self.args.world_size
        self._last_log = (0, time.monotonic())

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.schedule)
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            step, now = self.state.global_step, time.monotonic()
            last_step, last_time = self._last_log
            logs["tokens_per_s"] = round((step - last_step) * self.tokens_per_step / max(now - last_time, 1e-9))
            logs["tokens_seen"] = step * self.tokens_per_step
            logs["planned_steps"] = self.schedule.total_steps
            self._last_log = (step, now)
        super().log(logs, start_time)


def save_loss_curve(log_history: list[dict], facts: dict, output: str) -> None:
    """Write ``loss_curve.json`` (`facts` and the log history) into `output`, then ``loss_curve.png``."""
    with open(os.path.join(output, "loss_curve.json"), "w") as handle:
        json.dump({**facts, "log_history": log_history}, handle, indent=1)
    try:
        plot_loss_curve(output)
    except ImportError as error:  # the GPU machine may lack matplotlib; the JSON holds everything
        print(f"loss_curve.png not written ({error}); render it later with plot_loss_curve({output!r})")


def plot_loss_curve(output: str) -> None:
    """Render ``loss_curve.png`` (train and validation loss per optimizer step) from ``loss_curve.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output, "loss_curve.json")) as handle:
        run = json.load(handle)
    train = [(row["step"], row["loss"]) for row in run["log_history"] if "loss" in row]
    evals = [(row["step"], row["eval_loss"]) for row in run["log_history"] if "eval_loss" in row]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run['name']}: {run['parameters'] / 1e6:.1f} M parameters, trained at {run['seq_len']} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss_curve.png"), dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--config", dest="model", choices=sorted(MODEL_SHAPES), default="target")
    parser.add_argument("--tokenizer", required=True, help="folder of the trained tokenizer")
    parser.add_argument("--output", required=True, help="folder for the model, tokenizer and loss curve")
    parser.add_argument("--max-steps", type=int, default=20_000, help="planned optimizer steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap for this process")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per step (default per model)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=1024, help="training length in tokens")
    parser.add_argument("--max-train-bytes", type=int, default=None, help="cap on the train split's text")
    parser.add_argument("--roots", nargs="+", default=None, help="corpus roots (default: this Python's)")
    parser.add_argument("--passkey-fraction", type=float, default=0.07, help="share of passkey blocks")
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks for the eval loss")
    parser.add_argument("--eval-steps", type=int, default=500, help="eval every N steps (0: only at end)")
    parser.add_argument("--logging-steps", type=int, default=25)
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--token-cache", default=None, help="file to reuse the tokenized corpus from")
    parser.add_argument("--model-overrides", type=json.loads, default={}, help="JSON dict of config fields")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="softmax",
                        help='"softmax" (stock sdpa) or an hf-longctx attention feature patched in before training, '
                             'e.g. "softplus" (LSSAR) or "softplus:reweight=false" (LSSA); saved in config.json')
    args = parser.parse_args(argv)
    if not 0.0 <= args.passkey_fraction < 1.0:
        parser.error(f"--passkey-fraction must be in [0, 1), got {args.passkey_fraction}")
    return args


def tokenizer_files(folder: str) -> list[str]:
    """Names of the tokenizer's files in `folder`, which may be a whole model folder (a reference model's
    tokenizer): its weights, config, card and eval results are not the new model's."""
    names = {"special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"}
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                  and (n.startswith("tokenizer") or n in names))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = model_config(args.model, tokenizer, args.seq_len, args.model_overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if args.attention != "softmax":
        import hf_longctx as lc

        lc.patch(model, attention=args.attention)  # writes config.longctx, so the saved model re-applies it
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {parameters:,} parameters ({parameters / 1e6:.2f} M, tied embedding "
          f"{config.vocab_size * config.hidden_size / 1e6:.2f} M)")

    streams = corpus_streams(tokenizer, args.roots, args.max_train_bytes, 8 * args.eval_blocks * args.seq_len,
                             args.token_cache)
    text_blocks = stream_blocks(streams["train"], args.seq_len)
    num_passkey = round(len(text_blocks) * args.passkey_fraction / (1.0 - args.passkey_fraction))
    passkey_ids, passkey_lengths = passkey_blocks(tokenizer, num_passkey, args.seq_len, random.Random(args.seed))
    train_set = BlockDataset(torch.cat([text_blocks.ids, passkey_ids]),
                             torch.cat([text_blocks.lengths, passkey_lengths]))
    eval_set = stream_blocks(streams["validation"], args.seq_len)
    eval_set = BlockDataset(eval_set.ids[: args.eval_blocks], eval_set.lengths[: args.eval_blocks])
    print(f"data: {len(text_blocks)} text + {num_passkey} passkey blocks of {args.seq_len} tokens, "
          f"{len(eval_set)} validation blocks; ready after {time.monotonic() - _START:.1f} s")

    model_lr = args.lr or DEFAULT_LR[args.model]
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[args.model]
    schedule = CosineSchedule(min(args.warmup_steps, max(1, args.max_steps // 10)), args.max_steps)
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=model_lr,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        prediction_loss_only=True,  # the eval keeps no logits (64 blocks x 1024 x 8192 floats would be 2 GB)
        eval_strategy="steps" if args.eval_steps > 0 and len(eval_set) else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=cuda,
        dataloader_drop_last=True,
        seed=args.seed,
    )
    callbacks = []
    if args.max_minutes is not None:
        callbacks.append(TimeBudget(_START + 60.0 * args.max_minutes - SAVE_RESERVE_S, schedule))
    trainer = PretrainTrainer(model=model, args=training_args, train_dataset=train_set,
                              eval_dataset=eval_set if len(eval_set) else None, callbacks=callbacks,
                              schedule=schedule, seq_len=args.seq_len)
    train_start = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - train_start
    evals = [row for row in trainer.state.log_history if "eval_loss" in row]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        final = evals[-1]
    else:
        final = trainer.evaluate() if len(eval_set) else {}

    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model).to(torch.bfloat16)
        model.config.use_cache = True  # the Trainer turned it off for training
        model.save_pretrained(args.output)
        for name in tokenizer_files(args.tokenizer):  # the tokenizer's files as trained, byte for byte
            shutil.copy(os.path.join(args.tokenizer, name), args.output)
        facts = dict(
            name=args.model,
            parameters=parameters,
            seq_len=args.seq_len,
            steps=trainer.state.global_step,
            tokens_seen=trainer.state.global_step * trainer.tokens_per_step,
            train_seconds=round(train_s, 1),
            train_tokens_per_s=round(trainer.state.global_step * trainer.tokens_per_step / max(train_s, 1e-9)),
            eval_loss=final.get("eval_loss"),
            eval_perplexity=math.exp(final["eval_loss"]) if "eval_loss" in final else None,
            corpus_tokens=len(streams["train"]),
            train_blocks=len(text_blocks),
            passkey_blocks=num_passkey,
            batch_size=batch_size,
            learning_rate=model_lr,
            device=torch.cuda.get_device_name() if cuda else "cpu",
            torch=torch.__version__,
            transformers=transformers.__version__,
            command=shlex.join(["recipes/pretrain.py", *(sys.argv[1:] if argv is None else argv)]),
        )
        save_loss_curve(trainer.state.log_history, facts, args.output)
        print(f"saved {args.output}: {facts['steps']} steps, {facts['tokens_seen'] / 1e6:.1f} M tokens, "
              f"{facts['train_tokens_per_s']:,} tokens/s, eval loss {facts['eval_loss']}, "
              f"{time.monotonic() - _START:.1f} s since start")


if __name__ == "__main__":
    main()
