"""Training data: the mixture split into training and held-out validation records, and a stream
of collated micro-batches per rank that resumes exactly.

Held-out split: `val_samples` distinct records (a record is a (source, row) pair; a mixture that
repeats a source holds it several times) are drawn with the run's seed; every copy of them leaves
the training set, so the validation loss never measures a record the model trained on.

Batches: `GroupedBatchSampler` plans each epoch (modality- and length-grouped, the same number of
batches on every rank). A `DataLoader` over *batch numbers* fetches them, so with workers the
prefetching never moves the position the checkpoint records, and each batch is made under a seed
derived from (seed, epoch, batch number), whichever worker makes it: a resumed run sees the same
bytes. Epochs follow each other without a gap; an optimizer step may span two.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..data import DataCollator, GroupedBatchSampler, InstructionDataset


class DatasetView(torch.utils.data.Dataset):
    """Some items of an `InstructionDataset`, with the per-item lengths and image counts a sampler needs."""

    def __init__(self, dataset: InstructionDataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.lengths, self.image_counts = dataset.lengths[self.indices], dataset.image_counts[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.indices[i])]


def split_validation(dataset: InstructionDataset, val_samples: int, seed: int) -> tuple[DatasetView, DatasetView | None]:
    """(train, val): `val_samples` distinct records held out, all their copies removed from train."""
    n = len(dataset)
    if val_samples == 0:
        return DatasetView(dataset, np.arange(n)), None
    pairs = dataset.mixture.order  # (N, 2): (source, row) of every item
    keys = pairs[:, 0] * (int(pairs[:, 1].max(initial=0)) + 1) + pairs[:, 1]
    distinct, first = np.unique(keys, return_index=True)
    if val_samples >= len(distinct):
        raise ValueError(f"val_samples={val_samples} leaves no training record: the mixture has "
                         f"{len(distinct)} distinct records")
    chosen = np.random.default_rng([seed, 17]).choice(len(distinct), size=val_samples, replace=False)
    held = np.isin(keys, distinct[chosen])
    return DatasetView(dataset, np.flatnonzero(~held)), DatasetView(dataset, np.sort(first[chosen]))


def collate_with_names(collator: DataCollator, items: list[dict]) -> dict:
    """The collated batch plus each row's source name (for per-source losses)."""
    batch = collator(items)
    batch["sources"] = [item["source"] for item in items]
    return batch


class _EpochBatches(torch.utils.data.Dataset):
    """Batch number k of one epoch -> that collated batch, made under the seed of (seed, epoch, k)."""

    def __init__(self, view: DatasetView, batches: list[list[int]], collator: DataCollator, seed: int, epoch: int):
        self.view, self.batches, self.collator, self.seed, self.epoch = view, batches, collator, seed, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, k]).generate_state(1)[0])
        saved = random.getstate(), np.random.get_state()  # without workers this runs in the trainer
        random.seed(seed)
        np.random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                batch = collate_with_names(self.collator, [self.view[i] for i in self.batches[k]])
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        batch["epoch"], batch["batch_index"] = self.epoch, k
        return batch


@dataclass
class Position:
    epoch: int = 0
    batches_done: int = 0  # of this epoch, on this rank


class BatchStream:
    """Collated micro-batches of one rank, epoch after epoch, from a saved position."""

    def __init__(self, view: DatasetView, collator: DataCollator, batch_size: int, rank: int, world_size: int,
                 seed: int, workers: int = 0):
        self.view, self.collator, self.seed, self.workers = view, collator, seed, workers
        self.sampler = GroupedBatchSampler.from_dataset(view, batch_size=batch_size, num_replicas=world_size,
                                                        rank=rank, seed=seed)
        self.position = Position()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict:
        self.sampler.set_epoch(self.position.epoch)
        return self.sampler.state_dict(batches_done=self.position.batches_done)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.position = Position(self.sampler.epoch, self.sampler.batches_done)

    def __iter__(self):
        while True:
            epoch, start = self.position.epoch, self.position.batches_done
            batches = self.sampler.batches(epoch)
            epoch_data = _EpochBatches(self.view, batches, self.collator, self.seed, epoch)
            # its own generator: starting a loader draws a base seed, which from the global RNG would
            # shift the dropout stream wherever an epoch starts (and differently after a resume)
            loader = torch.utils.data.DataLoader(epoch_data, batch_size=None, sampler=range(start, len(batches)),
                                                 num_workers=self.workers, generator=torch.Generator())
            for batch in loader:
                self.position.batches_done += 1
                yield batch
            self.position = Position(epoch + 1, 0)
