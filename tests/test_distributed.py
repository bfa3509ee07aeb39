"""Multi-process training on CPUs (gloo): our attention under FSDP2, DDP and a distributed ``Trainer``.

Two processes are spawned ONCE for the module (``distributed`` fixture; spawning costs most of the time on a
small machine) and run every scenario in ``SCENARIOS`` in turn; each rank trains on its half of the same global
batches. A scenario that raises records its traceback instead of a result, so the others still run and its own
test fails with that traceback. Each test then trains the same model in this process on the whole global batch
and requires the same losses (the mean of the ranks' losses) and the same final gradients (gathered from the
shards) within float32 tolerance: sharded parameters, sharded AdamW updates and gradient averaging must not
change what our attention computes.

Scenarios:
- ``fsdp2_exact``: ``torch.distributed.fsdp.fully_shard`` per decoder layer, then ``lc.patch(attention=EXACT)``
  on the already-sharded model; compared with stock sdpa in one process. ``lc.unpatch`` on the sharded model
  must restore sdpa.
- ``fsdp2_longlora``: the ``recipes/extend_context.py`` stack: ``lc.patch(attention="s2_sink:8")``, LongLoRA's
  PEFT adapters, non-reentrant gradient checkpointing, then FSDP2; compared with the same stack in one process.
- ``ddp_s2``: ``DistributedDataParallel`` around a model patched with ``"s2:8"``.
- ``trainer_ddp``: ``transformers.Trainer`` with ``use_cpu=True`` in the two processes (accelerate's MULTI_CPU,
  gloo) on a model patched with EXACT; compared with a one-process Trainer on stock sdpa, batch 2 x 2 vs 4.

Not covered here: accelerate / Trainer with FSDP. accelerate switches to FSDP only for GPU-like distributed types
(``AcceleratorState`` keeps ``MULTI_CPU`` without FSDP), so ``recipes/fsdp2.yaml`` is exercised by
``test_accelerate_fsdp2_recipe_cuda`` (2+ GPUs) and ``recipes/run_gpu_multi.sh``.
"""

import datetime
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import hf_longctx as lc
from tests.test_convergence import EXACT, FP32_TOL, _Sequences, assert_same_training, train
from tests.tiny_models import random_ids, tiny_model

WORLD = 2
STEPS = 4
GLOBAL_BATCH, LENGTH = 4, 32  # LENGTH: a multiple of the s2 group (8)
S2_SINK = "s2_sink:8"
S2 = "s2:8"
LORA_LR = 1e-2


def global_batches() -> list[torch.Tensor]:
    return [random_ids(GLOBAL_BATCH, LENGTH, seed=step) for step in range(STEPS)]


def local_batches(rank: int) -> list[torch.Tensor]:
    """Rank `rank`'s rows of every global batch (the batch split evenly over WORLD ranks)."""
    rows = GLOBAL_BATCH // WORLD
    return [ids[rank * rows:(rank + 1) * rows] for ids in global_batches()]


def longlora_model(attention: str | None):
    """A tiny Llama, optionally patched, with LongLoRA adapters (r=4) and non-reentrant gradient checkpointing."""
    model = tiny_model("llama")
    if attention:
        lc.patch(model, attention=attention)
    lc.training.enable_activation_checkpointing(model)
    return get_peft_model(model, lc.training.longlora_peft_config(r=4))


def trainer_losses(model, output_dir: str, per_device_batch: int) -> tuple[list[float], int]:
    """Logged losses of STEPS Trainer steps on 8 sequences (per step: per_device_batch x processes sequences),
    and the number of processes the Trainer ran on."""
    args = TrainingArguments(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=per_device_batch,
                             learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             save_strategy="no", disable_tqdm=True, ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=args, train_dataset=_Sequences(random_ids(2 * GLOBAL_BATCH, LENGTH)))
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row], args.world_size


# --- what each rank runs -------------------------------------------------------------------------------------


def _shard(model, mesh) -> None:
    """FSDP2: every decoder layer (the model's `_no_split_modules`) is one shard unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in model.modules():
        if type(module).__name__ in base._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _gathered(losses: list[float], grads: dict[str, torch.Tensor], strip: str = "") -> tuple[list, dict]:
    """The ranks' mean losses and full gradients (DTensor shards gathered; DDP's are already all-reduced)."""
    mean_losses = torch.tensor(losses)
    dist.all_reduce(mean_losses)
    full = {}
    for name, grad in grads.items():
        full[name.removeprefix(strip)] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return (mean_losses / dist.get_world_size()).tolist(), full


def _fsdp2_exact(rank: int, mesh, workdir: str) -> dict:
    model = tiny_model("llama")
    _shard(model, mesh)
    lc.patch(model, attention=EXACT)
    result = dict(training=_gathered(*train(model, local_batches(rank))), sharded=type(model).__name__)
    lc.unpatch(model)
    result["after_unpatch"] = model.config._attn_implementation
    return result


def _fsdp2_longlora(rank: int, mesh, workdir: str) -> dict:
    model = longlora_model(S2_SINK)
    _shard(model, mesh)
    return dict(training=_gathered(*train(model, local_batches(rank), lr=LORA_LR)))


def _ddp_s2(rank: int, mesh, workdir: str) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(lc.patch(tiny_model("llama"), attention=S2))
    return dict(training=_gathered(*train(model, local_batches(rank)), strip="module."))


def _trainer_ddp(rank: int, mesh, workdir: str) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    model = lc.patch(tiny_model("llama"), attention=EXACT)
    losses, world_size = trainer_losses(model, os.path.join(workdir, "trainer"), GLOBAL_BATCH // WORLD)
    return dict(losses=losses, world_size=world_size)


SCENARIOS = {"fsdp2_exact": _fsdp2_exact, "fsdp2_longlora": _fsdp2_longlora, "ddp_s2": _ddp_s2,
             "trainer_ddp": _trainer_ddp}


def _rank_main(rank: int, workdir: str) -> None:
    """One rank: join the gloo group through a file store, run every scenario, rank 0 saves the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a rank stuck in a collective fails, not hangs
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(rank, mesh, workdir)
        except Exception:  # recorded for the scenario's test; the next scenario still runs
            results[name] = f"rank {rank}:\n{traceback.format_exc()}"
        dist.barrier()
    if rank == 0:
        torch.save(results, os.path.join(workdir, "results.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict:
    """{scenario: result dict, or the traceback string of a rank that raised} from one 2-process run."""
    workdir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_rank_main, args=(str(workdir),), nprocs=WORLD, join=True)
    return torch.load(workdir / "results.pt", weights_only=False)


def scenario_result(distributed: dict, name: str) -> dict:
    result = distributed[name]
    if isinstance(result, str):
        pytest.fail(f"scenario {name} raised in a worker:\n{result}")
    return result


# --- the tests: each scenario against one process on the global batch -----------------------------------------


def test_fsdp2_trains_like_one_process_on_stock_attention(distributed):
    result = scenario_result(distributed, "fsdp2_exact")
    assert result["sharded"].startswith("FSDP")
    reference = train(tiny_model("llama"), global_batches())
    assert_same_training(reference, result["training"], FP32_TOL)
    assert result["after_unpatch"] == "sdpa"


def test_fsdp2_longlora_s2_sink_trains_like_one_process(distributed):
    result = scenario_result(distributed, "fsdp2_longlora")
    reference = train(longlora_model(S2_SINK), global_batches(), lr=LORA_LR)
    assert_same_training(reference, result["training"], FP32_TOL)
    assert any("lora_A" in name for name in result["training"][1])
    assert not any("mlp" in name for name in result["training"][1])  # frozen under FSDP2 too


def test_ddp_s2_trains_like_one_process(distributed):
    result = scenario_result(distributed, "ddp_s2")
    reference = train(lc.patch(tiny_model("llama"), attention=S2), global_batches())
    assert_same_training(reference, result["training"], FP32_TOL)


def test_trainer_ddp_on_cpus_trains_like_one_process_on_stock_attention(distributed, tmp_path):
    result = scenario_result(distributed, "trainer_ddp")
    losses = result["losses"]
    reference, one = trainer_losses(tiny_model("llama"), str(tmp_path), GLOBAL_BATCH)
    assert result["world_size"] == WORLD and one == 1 and len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), **FP32_TOL)


# --- on 2+ GPUs: accelerate's FSDP2 through recipes/fsdp2.yaml --------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_accelerate_fsdp2_recipe_cuda(tmp_path):
    """recipes/fsdp2.yaml + recipes/extend_context.py on 2 GPUs (the Triton s2_sink kernel, LongLoRA, gradient
    checkpointing) on the reference target model: it trains to a finite loss and saves the merged model with its
    longctx config."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "recipes/fsdp2.yaml"),
               "--num_processes", "2", str(root / "recipes/extend_context.py"),
               "--model", str(root / "model_cards/longctx-target-20m"), "--output", str(out), "--seq-len", "2048",
               "--rope", "linear:2", "--attention", "s2_sink", "--max-steps", "6", "--grad-accum", "1",
               "--logging-steps", "1", "--max-train-bytes", "2000000"]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    curve = json.loads((out / "loss_curve.json").read_text())
    losses = [row["loss"] for row in curve["log_history"] if "loss" in row]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert json.loads((out / "config.json").read_text())["longctx"]["attention"]["type"] == "s2_sink"
