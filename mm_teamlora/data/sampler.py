"""A batch sampler that groups by modality and by length (as LLaVA's `group_by_modality_length`),
splits every step evenly over data-parallel ranks, and can resume at the next unseen batch.

    sampler = GroupedBatchSampler.from_dataset(dataset, batch_size=8, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)          # keeps a loaded position when the epoch is the same
        for batch in loader: ...
    state = sampler.state_dict()          # save with the checkpoint; sampler.load_state_dict(state) resumes

An epoch's plan (the same on every rank: a function of `seed`, the epoch and the data):
1. Indices split into image samples (`image_counts > 0`) and text-only ones (`group_by_modality`).
2. Each group is shuffled; its first `floor(n / M) * M` indices (M = num_replicas * batch_size, one
   *step*) are cut into pools of `pool_batches` steps, each pool sorted by length (longest first),
   then cut into steps: a step holds samples of one modality and similar length.
   `pool_batches=1` is LLaVA's megabatch (sorting within one step only).
3. Full steps of all groups are shuffled together. The groups' leftovers (fewer than M each) form
   the *tail*, sorted by (modality, length) and placed last, as LLaVA places its mixed last batch.
4. A step goes to the ranks round-robin (rank r gets its positions r, r + R, ...), so every rank
   gets the same number of batches and similar lengths.

Uneven sizes, `drop_last=False` (default): every index exactly once per epoch across ranks. The
tail becomes `t = ceil(len(tail) / M)` steps of near-equal size, so its batches may be smaller
than `batch_size` and differ by at most one sample between ranks; when the tail has fewer samples
than ranks, the last full step joins it (two smaller steps). Only when no exact split exists (fewer
samples than ranks, or `batch_size=1` with `len % num_replicas != 0`) are the missing places filled
by repeating the epoch's first samples, as `DistributedSampler` pads. `drop_last=True`: the tail is
dropped (at most `2 * M - 2` samples, different ones each epoch); all batches are full.

Position: the sampler counts the batches it has yielded in the current epoch; `state_dict()` holds
(epoch, batches_done) plus the settings that determine the plan, and a sampler given that state
continues with the next unseen batch in the same order. With DataLoader workers the loader fetches
batches ahead of training: pass the training loop's own count (`state_dict(batches_done=k)`).
Iterating again after a completed pass replays the epoch unless `set_epoch` changes it (as
`DistributedSampler`).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

PLAN_KEYS = ("num_samples", "batch_size", "num_replicas", "seed", "drop_last", "group_by_modality",
             "group_by_length", "pool_batches", "fingerprint")


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank; see the module doc for the plan and the uneven-size policy."""

    def __init__(self, lengths, image_counts=None, batch_size: int = 1, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, group_by_modality: bool = True,
                 group_by_length: bool = True, drop_last: bool = False, pool_batches: int = 16):
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        image_counts = (np.zeros_like(lengths) if image_counts is None
                        else np.asarray(image_counts, dtype=np.int64).reshape(-1))
        if image_counts.shape != lengths.shape:
            raise ValueError(f"lengths ({lengths.shape[0]}) and image_counts ({image_counts.shape[0]}) differ in size")
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = (torch.distributed.get_world_size() if dist else 1) if num_replicas is None else num_replicas
            rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
        for name, value in (("batch_size", batch_size), ("num_replicas", num_replicas), ("pool_batches", pool_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if len(lengths) == 0:
            raise ValueError("no samples")
        self.lengths, self.image_counts = lengths, image_counts
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.group_by_modality, self.group_by_length = group_by_modality, group_by_length
        self.drop_last, self.pool_batches = drop_last, pool_batches
        digest = hashlib.sha1(lengths.tobytes())
        digest.update(image_counts.tobytes())
        self.fingerprint = digest.hexdigest()[:16]
        self.epoch = 0
        self._position = 0  # batches of this epoch yielded (or loaded)
        self._finished = False  # the last iteration ran to the end of the epoch
        self._plans: dict[int, list[list[list[int]]]] = {}

    @classmethod
    def from_dataset(cls, dataset, batch_size: int, **kwargs) -> "GroupedBatchSampler":
        """From an `InstructionDataset` (its `lengths` and `image_counts`)."""
        return cls(dataset.lengths, dataset.image_counts, batch_size=batch_size, **kwargs)

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    # ---- the plan
    def plan(self, epoch: int | None = None) -> list[list[list[int]]]:
        """Every step of an epoch: a list (one per rank) of index lists. Cached for the last epoch."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            self._plans = {epoch: self._make_plan(epoch)}
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> list[list[list[int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        R, step = self.num_replicas, self.num_replicas * self.batch_size
        has_image = self.image_counts > 0
        if self.group_by_modality:
            groups = [np.flatnonzero(has_image), np.flatnonzero(~has_image)]
        else:
            groups = [np.arange(self.num_samples)]
        full: list[np.ndarray] = []
        tail: list[np.ndarray] = []
        for group in groups:
            if len(group) == 0:
                continue
            order = group[rng.permutation(len(group))]
            n_full = len(order) // step * step
            head, rest = order[:n_full], order[n_full:]
            if self.group_by_length:
                pool = self.pool_batches * step
                head = np.concatenate([self._by_length(head[i:i + pool]) for i in range(0, n_full, pool)] or [head])
            full.extend(head[i:i + step] for i in range(0, n_full, step))
            tail.append(rest)
        full = [full[i] for i in rng.permutation(len(full))]
        rest = np.concatenate(tail) if tail else np.zeros(0, dtype=np.int64)
        steps = [self._deal(s) for s in full]
        if len(rest) and not self.drop_last:
            if len(rest) < R and full:  # too few to give every rank one: the last full step joins the tail
                rest = np.concatenate([full.pop(), rest])
                steps.pop()
            # modality first, then longest first (stable), so tail steps stay as grouped as they can
            key = np.lexsort((-self.lengths[rest], ~has_image[rest])) if self.group_by_length else \
                np.argsort(~has_image[rest], kind="stable")
            rest = rest[key]
            n_steps = math.ceil(len(rest) / step)
            if len(rest) < R * n_steps:  # no exact split exists: pad with the epoch's first samples
                first = np.concatenate(full + [rest])
                rest = np.concatenate([rest, np.resize(first, R * n_steps - len(rest))])
            bounds = np.linspace(0, len(rest), n_steps + 1).round().astype(int)
            steps.extend(self._deal(rest[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        return steps

    def _by_length(self, indices: np.ndarray) -> np.ndarray:
        return indices[np.argsort(-self.lengths[indices], kind="stable")]

    def _deal(self, indices: np.ndarray) -> list[list[int]]:
        return [indices[r::self.num_replicas].tolist() for r in range(self.num_replicas)]

    def batches(self, epoch: int | None = None, rank: int | None = None) -> list[list[int]]:
        """All of a rank's batches of an epoch, in order (default: this rank, the current epoch)."""
        rank = self.rank if rank is None else rank
        return [s[rank] for s in self.plan(epoch)]

    # ---- iteration and position
    def __len__(self) -> int:
        """Batches per rank per epoch (the whole epoch, whatever the position)."""
        return len(self.plan())

    @property
    def batches_done(self) -> int:
        return self._position

    @property
    def remaining(self) -> int:
        return len(self) - self._position

    def __iter__(self):
        if self._finished:  # a new pass over the same epoch (set_epoch was not called)
            self._position, self._finished = 0, False
        batches = self.batches()
        while self._position < len(batches):
            batch = batches[self._position]
            self._position += 1
            yield batch
        self._finished = True

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; the same epoch as now keeps the position (a resumed run)."""
        if epoch != self.epoch:
            self.epoch, self._position, self._finished = epoch, 0, False

    def state_dict(self, batches_done: int | None = None) -> dict:
        """The position (epoch, batches done in it) and the settings that fix the plan. Give
        `batches_done` when the loader runs ahead of training (DataLoader workers prefetch)."""
        done = self._position if batches_done is None else batches_done
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done {done} is outside [0, {len(self)}]")
        return {"epoch": self.epoch, "batches_done": int(done), **{k: getattr(self, k) for k in PLAN_KEYS}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the plan settings and the data must match."""
        mismatched = [f"{k}: saved {state.get(k)!r}, now {getattr(self, k)!r}" for k in PLAN_KEYS
                      if state.get(k) != getattr(self, k)]
        if mismatched:
            raise ValueError("the sampler state is for another plan (" + "; ".join(mismatched) + ")")
        self.epoch = int(state["epoch"])
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done {done} is outside [0, {len(self)}]")
        self._position, self._finished = done, False
