"""Extend a causal LM's context: RoPE scaling + shifted sparse attention (s2 / s2_sink) + LongLoRA (or QLoRA).

One GPU, DDP over the GPUs of a host, or FSDP2 (run from the repository root):

    PYTHONPATH=. accelerate launch --config_file recipes/single_gpu.yaml recipes/extend_context.py \\
        --model model_cards/longctx-target-20m --output runs/target-8k --seq-len 8192 --rope linear:8 --attention s2
    PYTHONPATH=. accelerate launch --config_file recipes/ddp.yaml --num_processes 2 recipes/extend_context.py \\
        --model model_cards/longctx-target-20m --output runs/target-8k --seq-len 8192 --rope linear:8 \\
        --attention s2_sink
    PYTHONPATH=. accelerate launch --config_file recipes/fsdp2.yaml --num_processes 2 recipes/extend_context.py \\
        --model model_cards/longctx-target-20m --output runs/target-8k --seq-len 8192 --rope linear:8 --attention s2

``--qlora`` loads the base model in NF4 4-bit (``hf_longctx.training.qlora``; needs ``hf-longctx[qlora]``; one
GPU or DDP, not FSDP2). ``--full-finetune`` trains every weight instead of LoRA (for small models, where rank-r
adapters on the attention leave too little capacity to relearn positions).

Data: the train split of ``hf_longctx.eval.corpus`` tokenized with the model's tokenizer, documents joined with
EOS and cut into blocks of ``--seq-len`` tokens, plus ``--passkey-fraction`` of blocks of synthetic passkey
documents up to ``--seq-len`` long (as ``recipes/pretrain.py`` does; retrieval at the new length is learnt from
them). Training: the model patched with ``--rope`` and ``--attention`` (``lc.patch``), then wrapped with
``lc.training.longlora_peft_config`` (LoRA on q, k, v, o + trainable embeddings and norms); gradient
checkpointing (``--no-gradient-checkpointing`` turns it off); HF ``Trainer`` with its progress bar, warmup then
cosine LR, ``tokens_per_s`` in every log line; ``--max-minutes`` ends the schedule by a wall-clock deadline.

Output folder: ``adapter/`` (the PEFT adapter as trained), the merged model in bf16 with its ``longctx`` config
(``lc.from_pretrained`` re-applies the patch; shifted sparse attention runs dense or sink attention outside
training), the tokenizer, ``loss_curve.json`` / ``.png`` (with the peak GPU memory) and the model card
``README.md`` (``hf_longctx.hub``).
"""

import argparse
import os
import random
import shlex
import sys
import time

import torch
import transformers
from peft import PeftModel, get_peft_model
from pretrain import (  # recipes/ is the script's folder; pretrain._START is this process's start
    _START,
    SAVE_RESERVE_S,
    BlockDataset,
    CosineSchedule,
    PretrainTrainer,
    TimeBudget,
    corpus_streams,
    passkey_blocks,
    save_loss_curve,
    stream_blocks,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

import hf_longctx as lc
from hf_longctx.hub import render_card, save_card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model: a folder or a Hub id")
    parser.add_argument("--output", required=True, help="folder for the adapter, merged model, loss curve, card")
    parser.add_argument("--seq-len", type=int, required=True, help="training length in tokens (the target context)")
    parser.add_argument("--rope", default=None, help="RoPE scaling shorthand, e.g. linear:8 or yarn:4")
    parser.add_argument("--attention", default="s2", help="training attention: s2, s2_sink, or their shorthands")
    parser.add_argument("--qlora", action="store_true", help="load the base model in NF4 4-bit (QLoRA)")
    parser.add_argument("--full-finetune", action="store_true", help="train every weight (no LoRA)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per device and step")
    parser.add_argument("--grad-accum", type=int, default=8, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (warmup, then cosine to 10%%)")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap for this process")
    parser.add_argument("--passkey-fraction", type=float, default=0.07, help="share of passkey blocks")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--roots", nargs="+", default=None, help="corpus roots (default: this Python's)")
    parser.add_argument("--max-train-bytes", type=int, default=None, help="cap on the train split's text")
    parser.add_argument("--token-cache", default=None, help="file to reuse the tokenized corpus from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.full_finetune and args.qlora:
        parser.error("--full-finetune and --qlora exclude each other (4-bit weights do not train)")
    if not 0.0 <= args.passkey_fraction < 1.0:
        parser.error(f"--passkey-fraction must be in [0, 1), got {args.passkey_fraction}")
    return args


def load_model(args: argparse.Namespace, dtype: torch.dtype):
    """The base model (4-bit with --qlora), patched, with gradient checkpointing and the LongLoRA adapter
    (none with --full-finetune)."""
    if args.qlora:
        model = lc.training.qlora(args.model, compute_dtype=dtype,
                                  gradient_checkpointing=args.gradient_checkpointing)
    else:
        # full fine-tuning keeps fp32 master weights (bf16 autocast); LoRA freezes the base, in `dtype`
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if args.full_finetune else dtype)
        if args.gradient_checkpointing:
            lc.training.enable_activation_checkpointing(model)
    model.config.use_cache = False
    lc.patch(model, rope=args.rope, attention=args.attention)
    if args.full_finetune:
        return model
    return get_peft_model(model, lc.training.longlora_peft_config(r=args.lora_r))


def save_merged(args: argparse.Namespace, adapter_dir: str) -> None:
    """Merge the adapter into a fresh bf16 copy of the base model (on the CPU) and save it, patched."""
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    lc.patch(base, rope=args.rope, attention=args.attention)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(args.output)


def save_bf16(output: str) -> None:
    """Rewrite the fully fine-tuned checkpoint in ``output`` (saved in fp32 by the Trainer) in bf16."""
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(output)
    args_file = os.path.join(output, "training_args.bin")
    if os.path.exists(args_file):
        os.remove(args_file)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    streams = corpus_streams(tokenizer, args.roots, args.max_train_bytes, 0, args.token_cache)
    text_blocks = stream_blocks(streams["train"], args.seq_len)
    num_passkey = round(len(text_blocks) * args.passkey_fraction / (1.0 - args.passkey_fraction))
    passkey_ids, passkey_lengths = passkey_blocks(tokenizer, num_passkey, args.seq_len, random.Random(args.seed))
    train_set = BlockDataset(torch.cat([text_blocks.ids, passkey_ids]),
                             torch.cat([text_blocks.lengths, passkey_lengths]))
    print(f"data: {len(text_blocks)} text + {num_passkey} passkey blocks of {args.seq_len} tokens; "
          f"ready after {time.monotonic() - _START:.1f} s")
    schedule = CosineSchedule(min(args.warmup_steps, max(1, args.max_steps // 10)), args.max_steps)
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
        use_cpu=not cuda,
        seed=args.seed,
    )
    callbacks = []
    if args.max_minutes is not None:
        callbacks.append(TimeBudget(_START + 60.0 * args.max_minutes - SAVE_RESERVE_S, schedule))
    trainer = PretrainTrainer(model=model, args=training_args, train_dataset=train_set, callbacks=callbacks,
                              schedule=schedule, seq_len=args.seq_len)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - start
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    adapter_dir = os.path.join(args.output, "adapter")
    if not args.full_finetune:
        trainer.save_model(adapter_dir)  # gathers the adapter under DDP and FSDP2
    else:
        trainer.save_model(args.output)  # the whole (patched) model, gathered under DDP and FSDP2

    if trainer.is_world_process_zero():
        if args.full_finetune:
            save_bf16(args.output)
        else:
            save_merged(args, adapter_dir)
        tokenizer.save_pretrained(args.output)
        tokens_per_step = trainer.tokens_per_step
        steps = trainer.state.global_step
        facts = dict(
            name=os.path.basename(os.path.normpath(args.output)),
            parameters=sum(p.numel() for p in model.parameters()),
            seq_len=args.seq_len,
            steps=steps,
            tokens_seen=steps * tokens_per_step,
            batch_size=args.batch_size * args.grad_accum * training_args.world_size,
            learning_rate=args.lr,
            passkey_blocks=num_passkey,
            peak_memory_gib=None if peak_gib is None else round(peak_gib, 2),
            train_seconds=round(train_s, 1),
            train_tokens_per_s=round(steps * tokens_per_step / max(train_s, 1e-9)),
            device=torch.cuda.get_device_name() if cuda else "cpu",
            torch=torch.__version__,
            transformers=transformers.__version__,
            command=shlex.join(["recipes/extend_context.py", *(sys.argv[1:] if argv is None else argv)]),
        )
        method = "full fine-tuning" if args.full_finetune else f"LongLoRA r={args.lora_r}" + (
            " on an NF4 base (QLoRA)" if args.qlora else "")
        memory = "" if peak_gib is None else f" Peak GPU memory in training: {peak_gib:.2f} GiB."
        description = (f"{args.model} extended to {args.seq_len} tokens with hf-longctx: rope={args.rope}, "
                       f"attention={args.attention} in training, {method}.{memory}")
        save_loss_curve(trainer.state.log_history, {**facts, "description": description}, args.output)
        card = save_card(render_card(args.output, base_model=args.model, description=description), args.output)
        print(f"saved {args.output}: {steps} steps in {train_s:.1f} s, {facts['train_tokens_per_s']:,} tokens/s, "
              f"peak memory {peak_gib} GiB; model card {card}")


if __name__ == "__main__":
    main()
