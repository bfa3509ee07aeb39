"""Training with hf-longctx: LongLoRA / QLoRA presets, Dataset Decomposition batching, E2-LLM collation.

    import hf_longctx as lc
    model = lc.patch(model, attention="sink:4096")          # our kernels train too (forward and backward)
    model = peft.get_peft_model(model, lc.training.longlora_peft_config())
    dataset = lc.training.DecomposedDataset(documents, min_length=256, max_length=8192)
    sampler = lc.training.LengthBucketBatchSampler(dataset.lengths, tokens_per_batch=65536)
    lc.training.BatchSamplerTrainer(model=model, args=args, train_dataset=dataset, batch_sampler=sampler).train()

Packing with ``transformers.DataCollatorWithFlattening`` (position ids restart per document) needs nothing
more: the ``longctx_*`` attention keeps the packed documents apart.
"""

from .collators import E2LLMCollator
from .decomposition import DecomposedDataset, LengthBucketBatchSampler, decompose
from .presets import enable_activation_checkpointing, longlora_peft_config, qlora
from .trainer import BatchSamplerTrainer

__all__ = [
    "BatchSamplerTrainer",
    "DecomposedDataset",
    "E2LLMCollator",
    "LengthBucketBatchSampler",
    "decompose",
    "enable_activation_checkpointing",
    "longlora_peft_config",
    "qlora",
]
