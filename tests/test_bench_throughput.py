"""bench/train_throughput.py's guards and clock: the peer's ranks train on different records, together on
exactly our global batch, both sides on the same batches, and both are timed alike (the bench itself is
not a test)."""

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


def _steps(tokens, ends):
    return [{"tokens": t, "end": e} for t, e in zip(tokens, ends)]


def test_both_sides_are_clocked_alike_over_the_steps_after_the_warm_up(bench):
    reports = [{"steps": _steps([10, 20, 30, 40], [1.0, 2.0, 4.0, 7.0]), "peak_rss_mb": 1.0},
               {"steps": _steps([11, 21, 31, 41], [1.1, 2.1, 4.1, 7.1]), "peak_rss_mb": 2.0}]
    figures = bench.clocked(reports, warmup=2)
    assert figures["tokens"] == 30 + 40 + 31 + 41  # every rank's steps 3 and 4
    assert figures["seconds"] == 5.0  # rank 0, from the end of step 2 to the end of step 4
    assert figures["rank_tokens"] == [[10, 20, 30, 40], [11, 21, 31, 41]]


def test_the_two_sides_must_train_on_the_same_batches(bench):
    ours, peer = {"rank_tokens": [[10, 20], [11, 21]]}, {"rank_tokens": [[10, 20], [11, 21]]}
    bench.check_same_batches(ours, peer, "teamlora")
    with pytest.raises(AssertionError, match="different batches"):
        bench.check_same_batches(ours, {"rank_tokens": [[10, 21], [11, 20]]}, "teamlora")
