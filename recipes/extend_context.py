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
GPU or DDP, not FSDP2).

Data: the train split of ``hf_longctx.eval.corpus`` tokenized with the model's tokenizer, documents joined with
EOS and cut into blocks of ``--seq-len`` tokens (as ``recipes/pretrain.py`` does). Training: the model patched
with ``--rope`` and ``--attention`` (``lc.patch``), then wrapped with ``lc.training.longlora_peft_config`` (LoRA on
q, k, v, o + trainable embeddings and norms); gradient checkpointing; HF ``Trainer`` with its progress bar.

Output folder: ``adapter/`` (the PEFT adapter as trained), the merged model in bf16 with its ``longctx`` config
(``lc.from_pretrained`` re-applies the patch; shifted sparse attention runs dense or sink attention outside
training), the tokenizer, ``loss_curve.json`` / ``.png`` and the model card ``README.md`` (``hf_longctx.hub``).
"""

import argparse
import os
import shlex
import sys
import time

import torch
import transformers
from peft import PeftModel, get_peft_model
from pretrain import corpus_streams, save_loss_curve, stream_blocks  # recipes/ is the script's folder
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

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
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per device and step")
    parser.add_argument("--grad-accum", type=int, default=8, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (LoRA)")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--roots", nargs="+", default=None, help="corpus roots (default: this Python's)")
    parser.add_argument("--max-train-bytes", type=int, default=None, help="cap on the train split's text")
    parser.add_argument("--token-cache", default=None, help="file to reuse the tokenized corpus from")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace, dtype: torch.dtype):
    """The base model (4-bit with --qlora), patched, with gradient checkpointing and the LongLoRA adapter."""
    if args.qlora:
        model = lc.training.qlora(args.model, compute_dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lc.patch(model, rope=args.rope, attention=args.attention)
    return get_peft_model(model, lc.training.longlora_peft_config(r=args.lora_r))


def save_merged(args: argparse.Namespace, adapter_dir: str) -> None:
    """Merge the adapter into a fresh bf16 copy of the base model (on the CPU) and save it, patched."""
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    lc.patch(base, rope=args.rope, attention=args.attention)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(args.output)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args, dtype)
    model.print_trainable_parameters()

    streams = corpus_streams(tokenizer, args.roots, args.max_train_bytes, 0, args.token_cache)
    train_set = stream_blocks(streams["train"], args.seq_len)
    print(f"data: {len(train_set)} blocks of {args.seq_len} tokens")
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
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
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set)
    start = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - start
    adapter_dir = os.path.join(args.output, "adapter")
    trainer.save_model(adapter_dir)  # gathers the adapter under DDP and FSDP2

    if trainer.is_world_process_zero():
        save_merged(args, adapter_dir)
        tokenizer.save_pretrained(args.output)
        tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * training_args.world_size
        steps = trainer.state.global_step
        facts = dict(
            name=os.path.basename(os.path.normpath(args.output)),
            parameters=sum(p.numel() for p in model.parameters()),
            seq_len=args.seq_len,
            steps=steps,
            tokens_seen=steps * tokens_per_step,
            batch_size=args.batch_size * args.grad_accum * training_args.world_size,
            learning_rate=args.lr,
            train_seconds=round(train_s, 1),
            train_tokens_per_s=round(steps * tokens_per_step / max(train_s, 1e-9)),
            device=torch.cuda.get_device_name() if cuda else "cpu",
            torch=torch.__version__,
            transformers=transformers.__version__,
            command=shlex.join(["recipes/extend_context.py", *(sys.argv[1:] if argv is None else argv)]),
        )
        save_loss_curve(trainer.state.log_history, facts, args.output)
        description = (f"{args.model} extended to {args.seq_len} tokens with hf-longctx: rope={args.rope}, "
                       f"attention={args.attention} in training, LongLoRA r={args.lora_r}"
                       f"{' on an NF4 base (QLoRA)' if args.qlora else ''}.")
        card = save_card(render_card(args.output, base_model=args.model, description=description), args.output)
        print(f"saved {args.output}: {steps} steps in {train_s:.1f} s; model card {card}")


if __name__ == "__main__":
    main()
