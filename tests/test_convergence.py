"""Convergence tests: tiny random models trained with and without ``lc.patch`` give the same losses and gradients.

``attention="sink:4096"`` with a window longer than the sequence is exact causal attention, so a model on our
attention (the PyTorch reference on the CPU, the Triton kernel with its backward on CUDA) must train like the
same model on stock sdpa: same loss at every AdamW step and the same final gradients, within the tolerance of
the dtype. Covered: a plain model, gradient checkpointing, a PEFT LoRA-wrapped model, ``transformers.Trainer``
and packed batches from ``DataCollatorWithFlattening`` (our attention keeps the documents apart).

Training-time shifted sparse attention (``s2`` / ``s2_sink``) has no stock counterpart: a model patched with it
must train like the same model on an oracle attention function, a dense masked softmax with each head's
(shifted) group and sink mask (``tests.test_training.dense_s2``).
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import AttentionInterface, DataCollatorWithFlattening, Trainer, TrainingArguments
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import hf_longctx as lc
from tests.test_training import dense_s2
from tests.tiny_models import random_ids, tiny_model

STEPS = 10
EXACT = "sink:4096"  # window >= every length here: dense causal attention
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_TOL = dict(rtol=5e-2, atol=5e-2)




def train(model, batches: list[torch.Tensor], lr: float = 1e-3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """AdamW steps on `batches` (each (B, S) token ids, labels = inputs); returns the losses and the last
    step's gradients (before its update), by parameter name."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses, grads = [], {}
    for ids in batches:
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    return losses, grads


def assert_same_training(reference, patched, tol) -> None:
    ref_losses, ref_grads = reference
    losses, grads = patched
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **tol)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def batches(device="cpu", batch: int = 2, length: int = 48) -> list[torch.Tensor]:
    return [random_ids(batch, length, seed=step).to(device) for step in range(STEPS)]


def both(build, run):
    """`run(model)` on a stock model and on the same model patched with EXACT attention."""
    reference = run(build())
    model = build()
    return reference, run(lc.patch(model, attention=EXACT))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_matches_sdpa(family):
    reference, patched = both(lambda: tiny_model(family), lambda m: train(m, batches()))
    assert_same_training(reference, patched, FP32_TOL)
    assert patched[0][-1] < patched[0][0]  # it learns


def test_gradient_checkpointing_matches_sdpa():
    def build():
        model = tiny_model("llama")
        lc.training.enable_activation_checkpointing(model)
        return model

    reference, patched = both(build, lambda m: train(m, batches()))
    assert_same_training(reference, patched, FP32_TOL)


def test_peft_lora_matches_sdpa():
    def build():
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            modules_to_save=["embed_tokens"])
        return get_peft_model(tiny_model("qwen3"), config)

    reference, patched = both(build, lambda m: train(m, batches(), lr=1e-2))
    assert_same_training(reference, patched, FP32_TOL)
    assert any("lora_A" in name for name in patched[1])


class _Sequences(Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_trainer_matches_sdpa(tmp_path):
    dataset = _Sequences(random_ids(8, 32))

    def run(model):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                 save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        return [row["loss"] for row in trainer.state.log_history if "loss" in row]

    reference, patched = both(lambda: tiny_model("llama"), run)
    assert len(patched) == 4
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(reference), **FP32_TOL)


def test_packed_documents_stay_apart():
    """A DataCollatorWithFlattening batch on our attention: loss and gradients of the separate documents."""
    documents = [random_ids(1, length, seed=length)[0].tolist() for length in (13, 30, 21)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in documents])
    assert "attention_mask" not in packed  # documents are told apart by the position_ids resets alone

    model = lc.patch(tiny_model("llama"), attention=EXACT).train()
    loss = model(**packed).loss
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    targets = sum(len(ids) - 1 for ids in documents)  # the collator masks each document's first label
    total = 0.0
    for ids in documents:
        ids = torch.tensor([ids])
        doc_loss = model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1) / targets
        doc_loss.backward()
        total += doc_loss.item()
    torch.testing.assert_close(loss.item(), total, **FP32_TOL)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, **FP32_TOL)


S2_GROUP, S2_SINKS = 16, 3  # 48-token batches: 3 groups; the shifted half has 4 (the outer two half-empty)
S2_ORACLE = "test_s2_oracle"


def s2_oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registry-signature attention: ``dense_s2`` in training, dense causal in eval mode (as ``longctx_s2``)."""
    assert attention_mask is None and dropout == 0.0 and scaling == query.shape[-1] ** -0.5
    if module.training:
        out = dense_s2(query, key, value, group=S2_GROUP, sinks=S2_SINKS)
    else:
        out = dense_s2(query, key, value, group=query.shape[2], sinks=0)
    return out.transpose(1, 2).contiguous(), None


def s2_pair(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Training results of the oracle model and of the same model patched with s2_sink (our attention)."""
    AttentionInterface.register(S2_ORACLE, s2_oracle_attention)
    AttentionMaskInterface.register(S2_ORACLE, flash_attention_mask)
    data = batches(device)
    oracle = tiny_model(family, attn_implementation=S2_ORACLE).to(device=device, dtype=dtype)
    reference = train(oracle, data)
    model = tiny_model(family).to(device=device, dtype=dtype)
    patched = train(lc.patch(model, attention=f"s2_sink:{S2_GROUP},{S2_SINKS}"), data)
    return reference, patched


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_s2_sink_training_matches_masked_oracle(family):
    reference, patched = s2_pair(family)
    assert_same_training(reference, patched, FP32_TOL)
    dense = train(tiny_model(family), batches())
    assert abs(dense[0][-1] - patched[0][-1]) > 1e-3  # the sparse pattern changes training (not dense)


def assert_close_training_bf16(reference, patched) -> None:
    """bf16 losses within BF16_TOL; every gradient within 10% relative (Frobenius) error."""
    torch.testing.assert_close(torch.tensor(patched[0]), torch.tensor(reference[0]), **BF16_TOL)
    assert patched[1].keys() == reference[1].keys() and patched[1]
    for name, grad in patched[1].items():
        error = (grad - reference[1][name]).norm() / reference[1][name].norm().clamp(min=1e-6)
        assert error < 0.1, f"{name}: relative gradient error {error:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_s2_sink_training_matches_masked_oracle_bf16_cuda(family):
    """bf16 on the GPU: s2_sink through the Triton kernel (forward and backward) trains like the oracle."""
    assert_close_training_bf16(*s2_pair(family, "cuda", torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_matches_sdpa_bf16_cuda(family):
    """bf16 on the GPU: our Triton kernel's forward and backward train like stock sdpa."""

    def build():
        return tiny_model(family).to(device="cuda", dtype=torch.bfloat16)

    assert_close_training_bf16(*both(build, lambda m: train(m, batches("cuda"))))
