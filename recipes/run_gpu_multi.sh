#!/usr/bin/env bash
# Multi-GPU job (issue 11), for a machine with 2 GPUs (nvidia-h200-x2). Run from the repository root:
#   bash recipes/run_gpu_multi.sh OUTDIR            # the real run: step limits sum to about 9 minutes
#   bash recipes/run_gpu_multi.sh OUTDIR --dry-run  # on a CPU: same steps, tiny sizes, gloo, no GPU
# Steps (each under its own timeout; a failing step is logged in summary.md and the next one runs):
#   1. pytest tests/test_distributed.py -m "not cuda" (the gloo scenarios, on this machine's versions)
#   2. recipes/extend_context.py on 1 GPU (single_gpu.yaml, grad-accum 8) and on 2 GPUs (fsdp2.yaml, grad-accum 4):
#      the same global batches; per-step loss difference and the tokens/s ratio -> fsdp2_vs_single.md
#   3. the longest trainable length (one forward + backward, batch 1, gradient checkpointing, bf16) by doubling:
#      our s2_sink kernel on 1 GPU and under FSDP2 on 2 GPUs; stock sdpa on 1 GPU and with torch context
#      parallelism (sequence split over 2 GPUs) -> max_length.md / max_length.jsonl
#   4. device_map="auto" over 2 GPUs vs one GPU: greedy tokens of the patched target (sink attention) +
#      LongCtxCache with snapkv eviction + speculative decoding with the reference draft -> device_map.md
# Everything lands in OUTDIR: env.txt, summary.md, one .log per step, the tables above, the runs' loss_curve.json.
set -uo pipefail

OUTDIR="${1:?usage: recipes/run_gpu_multi.sh OUTDIR [--dry-run]}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d)"  # merged models, token cache: not results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
unset TRITON_INTERPRET
SUMMARY="$OUTDIR/summary.md"
TARGET=model_cards/longctx-target-20m
DRAFT=model_cards/longctx-draft-3m
T0=$(date +%s)

if [ $DRY = 1 ]; then  # CPU: tiny lengths, one process for the "1 GPU" runs, gloo for the 2-process ones
  SEQ=64; STEPS=2; BYTES=200000; LENGTHS="256 512"; PROMPT=200; NEW=12
  TEST_T=240; TOKENIZE_T=120; LAUNCH_T=240; PROBE_T=120; INFER_T=240
  SINGLE_CFG=(--cpu --num_processes 1); MULTI_CFG=(--cpu --num_processes 1)  # accelerate has no FSDP on CPU
else
  # time limits sum to about 550 s (one device call: 600 s)
  SEQ=8192; STEPS=24; BYTES=8000000; LENGTHS="65536 131072 262144 524288 1048576 2097152"; PROMPT=6000; NEW=64
  TEST_T=60; TOKENIZE_T=50; LAUNCH_T=80; PROBE_T=45; INFER_T=70
  SINGLE_CFG=(--config_file recipes/single_gpu.yaml); MULTI_CFG=(--config_file recipes/fsdp2.yaml --num_processes 2)
fi

{
  date; echo "dry_run=$DRY"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, \
'gpus', torch.cuda.device_count())"
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"
printf '# run_gpu_multi.sh summary\n\n| step | exit code | seconds |\n|---|---|---|\n' > "$SUMMARY"

# step NAME TIMEOUT CMD...: runs CMD with its output in NAME.log, records the exit code (124: timed out).
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s, at $(( start - T0 )) s)"
  timeout -s INT -k 20 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc | $(( $(date +%s) - start )) |" >> "$SUMMARY"
  tail -5 "$OUTDIR/$name.log"
  return 0
}

# ---------------------------------------------------------------------------------------------- 1. tests
# not the cuda test: step 2 runs the same accelerate FSDP2 launch, with numbers
step pytest_distributed "$TEST_T" "$PY" -m pytest tests/test_distributed.py -m "not cuda" -q -rA -p no:cacheprovider

# ------------------------------------------------------------------------- 2. FSDP2 vs one GPU, same batches
EXTEND=(recipes/extend_context.py --model "$TARGET" --seq-len "$SEQ" --rope linear:8 --attention s2_sink
        --max-steps "$STEPS" --batch-size 1 --logging-steps 1 --warmup-steps 2 --max-train-bytes "$BYTES"
        --token-cache "$WORK/tokens.pt")
step tokenize "$TOKENIZE_T" "$PY" -c "
import sys; sys.path.insert(0, 'recipes')
from transformers import AutoTokenizer
from pretrain import corpus_streams
corpus_streams(AutoTokenizer.from_pretrained('$TARGET'), None, $BYTES, 0, '$WORK/tokens.pt')"
step extend_single "$LAUNCH_T" "$PY" -m accelerate.commands.launch "${SINGLE_CFG[@]}" "${EXTEND[@]}" \
  --output "$WORK/single" --grad-accum 8
step extend_fsdp2 "$LAUNCH_T" "$PY" -m accelerate.commands.launch "${MULTI_CFG[@]}" "${EXTEND[@]}" \
  --output "$WORK/fsdp2" --grad-accum $([ $DRY = 1 ] && echo 8 || echo 4)
for run in single fsdp2; do cp "$WORK/$run/loss_curve.json" "$OUTDIR/extend_${run}_loss_curve.json" 2>/dev/null; done
step compare_fsdp2 15 "$PY" - "$OUTDIR" <<'EOF'
import json, sys
out = sys.argv[1]
runs = {name: json.load(open(f"{out}/extend_{name}_loss_curve.json")) for name in ("single", "fsdp2")}
losses = {name: {row["step"]: row["loss"] for row in run["log_history"] if "loss" in row} for name, run in runs.items()}
steps = sorted(set(losses["single"]) & set(losses["fsdp2"]))
diffs = [abs(losses["single"][s] - losses["fsdp2"][s]) for s in steps]
single, fsdp2 = runs["single"], runs["fsdp2"]
lines = [f"# FSDP2 (2 GPUs) vs one GPU: recipes/extend_context.py, s2_sink, LongLoRA, seq {single['seq_len']}",
         "", f"device {fsdp2['device']}, torch {fsdp2['torch']}, transformers {fsdp2['transformers']}", "",
         f"commands: `{single['command']}` (single_gpu.yaml) and `{fsdp2['command']}` (fsdp2.yaml)", "",
         "| step | loss, 1 GPU | loss, FSDP2 | abs diff |", "|---|---|---|---|"]
lines += [f"| {s} | {losses['single'][s]:.4f} | {losses['fsdp2'][s]:.4f} | {d:.4f} |" for s, d in zip(steps, diffs)]
ratio = fsdp2["train_tokens_per_s"] / max(single["train_tokens_per_s"], 1)
lines += ["", f"max abs loss diff {max(diffs):.4f}, mean {sum(diffs) / len(diffs):.4f} over {len(steps)} steps "
          f"(same global batch of {single['batch_size']} sequences)", "",
          "| run | global batch | train s | tokens/s |", "|---|---|---|---|",
          f"| 1 GPU | {single['batch_size']} | {single['train_seconds']} | {single['train_tokens_per_s']} |",
          f"| FSDP2, 2 GPUs | {fsdp2['batch_size']} | {fsdp2['train_seconds']} | {fsdp2['train_tokens_per_s']} |",
          "", f"tokens/s scaling 2 GPUs / 1 GPU: {ratio:.2f}x (train_seconds includes the first, compiling steps)"]
open(f"{out}/fsdp2_vs_single.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# ------------------------------------------------------------------------------ 3. longest trainable length
cat > "$WORK/probe.py" <<'EOF'
"""One forward + backward per length (doubling) until out of memory; appends JSON lines to --out (rank 0)."""
import argparse, json, os, time
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
import hf_longctx as lc

parser = argparse.ArgumentParser()
parser.add_argument("--model"); parser.add_argument("--attention"); parser.add_argument("--mode")
parser.add_argument("--lengths", type=int, nargs="+"); parser.add_argument("--out")
args = parser.parse_args()
cuda = torch.cuda.is_available()
world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
if world > 1:
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                             attn_implementation="sdpa").to(device)
model.config.use_cache = False
lc.training.enable_activation_checkpointing(model)
if args.attention != "sdpa":
    lc.patch(model, attention=args.attention)
model.train()
mesh = None
if world > 1:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
if args.mode == "cp":  # accelerate's hooks drop HF's mask for is_causal=True, as Trainer's CP path does
    from accelerate.big_modeling import _attach_context_parallel_hooks
    _attach_context_parallel_hooks(model)


def step(length: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, length), device=device,
                        generator=torch.Generator(device).manual_seed(length))
    if args.mode != "cp":
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()
    from torch.distributed.tensor.experimental import context_parallel
    positions = torch.arange(length, device=device)[None]
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # labels shifted before sharding
    with context_parallel(mesh, buffers=[ids, positions, shifted], buffer_seq_dims=[1, 1, 1]):
        loss = model(input_ids=ids, position_ids=positions, labels=shifted, shift_labels=shifted).loss
        loss.backward()
    return loss.item()


for length in args.lengths:
    if cuda:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
    start, error = time.perf_counter(), None
    try:
        loss = step(length)
    except torch.OutOfMemoryError as oom:
        loss, error = None, f"OOM: {str(oom)[:160]}"
    model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    ok = torch.tensor([error is None], dtype=torch.int32, device=device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    row = dict(mode=args.mode, attention=args.attention, gpus=world, length=length, ok=bool(ok.item()),
               seconds=round(seconds, 2), loss=loss, error=error,
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    if rank == 0:
        print(row, flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    if not ok.item():
        break
if world > 1:
    dist.destroy_process_group()
EOF
PROBE=("$WORK/probe.py" --model "$TARGET" --lengths $LENGTHS --out "$OUTDIR/max_length.jsonl")
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)
step length_kernel_1gpu "$PROBE_T" "$PY" "${PROBE[@]}" --attention s2_sink --mode single
step length_kernel_fsdp2 "$PROBE_T" "${TORCHRUN[@]}" "${PROBE[@]}" --attention s2_sink --mode fsdp2
step length_sdpa_1gpu "$PROBE_T" "$PY" "${PROBE[@]}" --attention sdpa --mode single
step length_sdpa_cp "$PROBE_T" "${TORCHRUN[@]}" "${PROBE[@]}" --attention sdpa --mode cp
step table_length 15 "$PY" - "$OUTDIR" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/max_length.jsonl")]
lines = ["# Longest trainable length: one forward + backward, batch 1, gradient checkpointing (longctx-target-20m)",
         "", "| mode | attention | GPUs | length | ok | seconds | peak GiB / GPU | note |",
         "|---|---|---|---|---|---|---|---|"]
lines += [f"| {r['mode']} | {r['attention']} | {r['gpus']} | {r['length']} | {r['ok']} | {r['seconds']} | "
          f"{r['peak_gib']} | {r['error'] or ''} |" for r in rows]
best = {}
for r in rows:
    if r["ok"]:
        key = (r["mode"], r["attention"], r["gpus"])
        best[key] = max(best.get(key, 0), r["length"])
lines += ["", "| mode | attention | GPUs | longest length that trained |", "|---|---|---|---|"]
lines += [f"| {m} | {a} | {g} | {n} |" for (m, a, g), n in best.items()]
lines += ["", "A mode whose probe stopped on its time limit has no OOM row: its longest length is a lower bound."]
open(f"{out}/max_length.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# ------------------------------------------------------------------------------- 4. device_map inference
step device_map "$INFER_T" "$PY" - "$OUTDIR" "$TARGET" "$DRAFT" "$PROMPT" "$NEW" <<'EOF'
import json, sys
import torch
from transformers import AutoModelForCausalLM
import hf_longctx as lc

out, target_path, draft_path = sys.argv[1:4]
prompt_len, new = int(sys.argv[4]), int(sys.argv[5])
gpus = torch.cuda.device_count()
dtype = torch.bfloat16 if gpus else torch.float32
single = {"": 0} if gpus else {"": "cpu"}
# a 20M model fits one GPU: a small budget on GPU 0 makes "auto" put the later layers on GPU 1
split = dict(device_map="auto", max_memory={0: "24MiB", 1: "8GiB"}) if gpus >= 2 else dict(device_map=single)
prompt = torch.randint(3, 8192, (1, prompt_len), generator=torch.Generator().manual_seed(0))
SETUPS = {
    "sink attention": dict(attention="sink:1024,4"),
    "+ LongCtxCache, snapkv eviction": dict(attention="sink:1024,4", kv="snapkv:2048"),
    "+ speculative (draft model)": dict(attention="sink:1024,4", kv="snapkv:2048", speculative="draft"),
}


def generate(placement: dict, features: dict) -> tuple[list[int], dict]:
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=dtype, **placement).eval()
    features = dict(features)
    if features.get("speculative") == "draft":
        draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=dtype).to(model.device).eval()
        features["speculative"] = lc.Speculative(draft=draft)
    lc.patch(model, **features)
    with torch.no_grad():
        tokens = model.generate(input_ids=prompt.to(model.device), max_new_tokens=new, do_sample=False)
    return tokens[0, prompt_len:].tolist(), dict(getattr(model, "hf_device_map", {}) or {"": str(model.device)})


lines = [f"# device_map inference: {gpus} GPU(s), {target_path}, prompt {prompt_len} tokens, {new} greedy tokens", "",
         "| features | devices used (split run) | same tokens as one device | first difference |", "|---|---|---|---|"]
rows = []
for name, features in SETUPS.items():
    try:
        one, _ = generate(dict(device_map=single), features)
        two, device_map = generate(split, features)
        devices = sorted({str(d) for d in device_map.values()})
        first = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), None)
        same = one == two
        rows.append(dict(features=name, devices=devices, same=same, first_difference=first, one=one, two=two))
        lines.append(f"| {name} | {', '.join(devices)} | {same} | {'' if first is None else first} |")
    except Exception as error:  # one setup failing must not hide the others
        import traceback; traceback.print_exc()
        lines.append(f"| {name} | error | {type(error).__name__}: {str(error)[:200]} | |")
json.dump(rows, open(f"{out}/device_map.json", "w"), indent=1)
open(f"{out}/device_map.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

rm -rf "$WORK"
echo "| total | | $(( $(date +%s) - T0 )) |" >> "$SUMMARY"
cat "$SUMMARY"
