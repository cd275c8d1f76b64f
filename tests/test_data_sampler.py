"""GroupedBatchSampler: every index once per epoch across ranks, equal batch counts per rank,
modality and length grouping, and resuming at the next unseen batch."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from mm_teamlora.data.sampler import GroupedBatchSampler


def _data(n, seed=0, text_share=0.3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 400, size=n)
    image_counts = (rng.random(n) >= text_share).astype(np.int64)
    return lengths, image_counts


def _ranks(n, batch_size, num_replicas=2, epoch=0, **kwargs):
    lengths, counts = _data(n)
    samplers = [GroupedBatchSampler(lengths, counts, batch_size=batch_size, num_replicas=num_replicas, rank=r,
                                    **kwargs) for r in range(num_replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize("n,batch_size", [(64, 4), (101, 4), (203, 8), (7, 3), (9, 4), (2, 4), (37, 5), (130, 64)])
@pytest.mark.parametrize("epoch", [0, 3])
def test_two_ranks_cover_every_index_once(n, batch_size, epoch):
    samplers, runs = _ranks(n, batch_size, epoch=epoch)
    assert len(runs[0]) == len(runs[1]) == len(samplers[0]) == len(samplers[1])
    seen = Counter(i for run in runs for batch in run for i in batch)
    assert seen == Counter(range(n))  # nothing repeated, nothing lost
    assert all(1 <= len(b) <= batch_size for run in runs for b in run)
    for a, b in zip(*runs):  # ranks' batches of one step differ by at most one sample
        assert abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("num_replicas", [1, 3, 4])
def test_other_world_sizes(num_replicas):
    n = 150
    samplers, runs = _ranks(n, 6, num_replicas=num_replicas)
    assert len({len(r) for r in runs}) == 1
    assert Counter(i for run in runs for b in run for i in b) == Counter(range(n))


def test_padding_only_when_no_exact_split_exists():
    # batch_size 1 and an odd number of samples on 2 ranks: one sample is repeated to fill the last step
    samplers, runs = _ranks(7, 1)
    seen = Counter(i for run in runs for b in run for i in b)
    assert set(seen) == set(range(7)) and sum(seen.values()) == 8 and len(runs[0]) == len(runs[1]) == 4
    # fewer samples than ranks
    samplers, runs = _ranks(1, 4)
    assert runs == [[[0]], [[0]]]


def test_drop_last_gives_full_batches_and_drops_only_the_tail():
    n, b = 203, 8
    samplers, runs = _ranks(n, b, drop_last=True)
    assert len(runs[0]) == len(runs[1])
    flat = [i for run in runs for batch in run for i in batch]
    assert all(len(batch) == b for run in runs for batch in run)
    assert len(flat) == len(set(flat)) and n - len(flat) < 2 * 2 * b


def test_steps_hold_one_modality_except_the_tail():
    lengths, counts = _data(300)
    samplers = [GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=r) for r in range(2)]
    plan = samplers[0].plan()
    full_steps = 300 // 8 - 1  # at most the last two steps mix (the tail)
    mixed = [k for k, step in enumerate(plan) if len({bool(counts[i]) for batch in step for i in batch}) > 1]
    assert all(k >= len(plan) - 2 for k in mixed)
    assert sum(1 for step in plan[:full_steps] if all(counts[i] for b in step for i in b)) > 10
    assert sum(1 for step in plan[:full_steps] if not any(counts[i] for b in step for i in b)) > 3
    # without modality grouping, most steps mix
    flat = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, group_by_modality=False,
                               rank=0).plan()
    assert sum(len({bool(counts[i]) for b in step for i in b}) > 1 for step in flat) > len(flat) // 2


def test_length_grouping_reduces_padding():
    lengths, counts = _data(2000, seed=1)

    def padded(group_by_length):
        s = GroupedBatchSampler(lengths, counts, batch_size=8, num_replicas=1, rank=0,
                                group_by_length=group_by_length)
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in s)

    assert padded(True) < 0.2 * padded(False)  # padding tokens of batches padded to their longest


def test_plan_is_seeded_same_on_all_ranks_and_changes_with_the_epoch():
    lengths, counts = _data(120)
    a = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=0, seed=5)
    b = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=1, seed=5)
    assert a.plan() == b.plan()
    assert a.batches() == [step[0] for step in b.plan()]
    assert a.plan(0) != a.plan(1)
    assert a.plan(0) != GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=0, seed=6).plan(0)


def test_resume_continues_with_the_next_unseen_batch_on_every_rank():
    lengths, counts = _data(157)
    kwargs = dict(batch_size=5, num_replicas=2, seed=3)
    for rank in range(2):
        original = GroupedBatchSampler(lengths, counts, rank=rank, **kwargs)
        original.set_epoch(2)
        full = original.batches()
        it = iter(original)
        seen = [next(it) for _ in range(6)]
        state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
        assert state["epoch"] == 2 and state["batches_done"] == 6
        resumed = GroupedBatchSampler(lengths, counts, rank=rank, **kwargs)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the train loop's usual call keeps the loaded position
        rest = list(resumed)
        assert seen + rest == full and rest == list(it)
        assert resumed.remaining == 0
        resumed.set_epoch(3)  # the next epoch starts from its first batch
        assert list(resumed) == original.batches(epoch=3)


def test_resume_through_a_dataloader_with_the_loops_own_count():
    lengths, counts = _data(90)
    dataset = torch.utils.data.TensorDataset(torch.arange(90))
    sampler = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    got = []
    for step, (batch,) in enumerate(loader):
        got.append(batch.tolist())
        if step == 4:
            state = sampler.state_dict(batches_done=step + 1)
            break
    resumed = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    rest = [b.tolist() for (b,) in torch.utils.data.DataLoader(dataset, batch_sampler=resumed)]
    assert got + rest == sampler.batches()


def test_a_finished_epoch_replays_unless_the_epoch_changes():
    lengths, counts = _data(40)
    s = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=1, rank=0)
    first = list(s)
    assert s.state_dict()["batches_done"] == len(s)
    assert list(s) == first  # like DistributedSampler without set_epoch
    done = s.state_dict()
    fresh = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=1, rank=0)
    fresh.load_state_dict(done)
    assert list(fresh) == []  # a loaded finished epoch yields nothing; set_epoch moves on
    fresh.set_epoch(1)
    assert len(list(fresh)) == len(s)


def test_load_state_rejects_another_plan():
    lengths, counts = _data(50)
    state = GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="num_replicas"):
        GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=4, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        GroupedBatchSampler(lengths[::-1].copy(), counts, batch_size=4, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_done"):
        GroupedBatchSampler(lengths, counts, batch_size=4, num_replicas=2, rank=0).load_state_dict(
            {**state, "batches_done": 10_000})


def test_arguments_are_checked_and_from_dataset():
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler([1, 2], [0, 1], batch_size=1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler([1, 2], [0, 1], batch_size=0, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="differ"):
        GroupedBatchSampler([1, 2], [0], batch_size=1, num_replicas=1, rank=0)

    class Stub:
        lengths = np.array([3, 9, 4, 8, 5])
        image_counts = np.array([1, 0, 1, 0, 2])

    s = GroupedBatchSampler.from_dataset(Stub(), batch_size=2)  # no process group: 1 replica, rank 0
    assert (s.num_replicas, s.rank) == (1, 0)
    assert sorted(i for b in s for i in b) == [0, 1, 2, 3, 4]
