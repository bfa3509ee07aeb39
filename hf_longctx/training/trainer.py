"""The Trainer hook of Dataset Decomposition: ``transformers.Trainer`` fed by a batch sampler.

``Trainer`` builds its training DataLoader with a fixed ``per_device_train_batch_size``; a
:class:`~hf_longctx.training.decomposition.LengthBucketBatchSampler` decides each batch's size itself (constant
tokens, varying sequences). ``BatchSamplerTrainer`` takes it as ``batch_sampler=`` and builds the DataLoader
around it; the Trainer's per-epoch ``set_epoch`` reaches the sampler through accelerate's DataLoader, so every
epoch has its own order. Under data parallelism accelerate deals whole batches round-robin to the processes.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Sampler
from transformers import Trainer


class BatchSamplerTrainer(Trainer):
    """A ``Trainer`` whose training batches come from ``batch_sampler`` (lists of dataset indices).

    Args:
        batch_sampler: yields the dataset indices of each training batch; has ``__len__`` (batches per epoch).
        *args, **kwargs: as ``transformers.Trainer``; ``per_device_train_batch_size`` is not used for training.
    """

    def __init__(self, *args, batch_sampler: Sampler[list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("BatchSamplerTrainer: needs a `train_dataset`")
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)
