"""bench/train_throughput.py's guard on the peer's data: every rank trains on different records, and
together on exactly our global batch (the bench itself is not a test)."""

import importlib.util
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports nothing heavy at module level
    return module


def test_distinct_ranks_and_the_same_global_batch_pass(bench):
    bench.check_peer_batches([[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]], 8)


@pytest.mark.parametrize("steps_by_rank, global_batch, message", [
    ([[[0, 1, 2, 3]], [[0, 1, 2, 3]]], 8, "same records"),  # both ranks on one batch: the silent failure
    ([[[0, 1, 2, 3]], [[3, 4, 5, 6]]], 8, "same records"),
    ([[[0, 1]], [[2, 3]]], 8, "global batch 4"),
    ([[[0, 1, 2, 3]]], 4, "1 rank"),
    ([[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7]]], 8, "different step counts"),
])
def test_a_peer_that_repeats_or_shrinks_the_batch_fails(bench, steps_by_rank, global_batch, message):
    with pytest.raises(AssertionError, match=message):
        bench.check_peer_batches(steps_by_rank, global_batch)
