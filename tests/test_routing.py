"""The routing context, gradient checkpointing, generation, the balance loss and the recorder."""

import gc
import threading
import weakref

import pytest
import torch

from mm_teamlora.adapters import (adapter_layers, balance_loss, checkpoint_context_fn, collect_aux_loss,
                                  current_routing, generation_routing, record_routing, routing_context)
from helpers import adapted, grads, randomize_adapters


def group_routed(method="teamlora", **kw):
    model = adapted(method=method, group_routing=True, num_token_groups=3, **kw)
    randomize_adapters(model, seed=2, scale=1.0)
    return model


def groups_for(ids):
    groups = torch.zeros_like(ids)
    groups[:, 3:7] = 1
    groups[1] = 2
    return groups


def test_context_is_empty_after_the_block_and_nests():
    assert current_routing() is None
    outer, inner = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    with routing_context(outer) as a:
        assert current_routing() is a
        with routing_context(inner) as b:
            assert current_routing() is b and torch.equal(b.token_groups, inner)
        assert current_routing() is a
    assert current_routing() is None
    with pytest.raises(RuntimeError):
        with routing_context(outer):
            raise RuntimeError("boom")
    assert current_routing() is None


def test_context_is_invisible_to_other_threads():
    seen = []
    with routing_context(torch.zeros(1, 2, dtype=torch.long)):
        thread = threading.Thread(target=lambda: seen.append(current_routing()))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize("kwargs, error", [
    (dict(token_groups=torch.zeros(2, 3)), TypeError),
    (dict(token_groups=-torch.ones(2, 3, dtype=torch.long)), ValueError),
    (dict(token_mask=torch.full((2, 3), 2)), TypeError),
    (dict(token_groups=torch.zeros(2, 3, dtype=torch.long), token_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError),
])
def test_bad_routing_inputs_raise(kwargs, error):
    with pytest.raises(error):
        with routing_context(**kwargs):
            pass


def test_mismatched_grid_is_a_clear_error(batch):
    ids, mask = batch
    model = group_routed()
    with routing_context(torch.zeros(3, 12, dtype=torch.long)):
        with pytest.raises(ValueError, match="token grid"):
            model(input_ids=ids)


def test_group_routing_uses_groups_and_starts_as_the_papers_routing(batch):
    ids, mask = batch
    model = adapted(method="teamlora", group_routing=True)
    randomize_adapters(model, seed=4)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.group_bias.zero_()
        plain = model(input_ids=ids, attention_mask=mask).logits
        with routing_context(groups_for(ids)):
            zero_bias = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(plain, zero_bias)  # zero-initialised bias: exactly the paper's routing
        randomize_adapters(model, seed=4, scale=1.0)
        plain = model(input_ids=ids, attention_mask=mask).logits
        with routing_context(groups_for(ids)):
            grouped = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(plain, grouped)
    assert torch.equal(plain, after)  # nothing left behind by the block


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant", "context_fn", "worker-thread"])
def test_checkpointing_gives_the_same_gradients_with_group_routing(mode, batch):
    ids, mask = batch
    groups = groups_for(ids)

    # reentrant checkpointing runs the forward without grad, so no side loss can flow from it
    balance_weight = 0.0 if mode == "reentrant" else 0.1

    def run(checkpointing: bool):
        model = group_routed(balance_weight=balance_weight)
        model.train()
        if checkpointing:
            kwargs = {"use_reentrant": mode == "reentrant"}
            if mode == "context_fn":
                kwargs["context_fn"] = checkpoint_context_fn
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        with routing_context(groups, mask.bool()):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            loss = out.loss + collect_aux_loss(model)
        # backward after the block has closed; with "worker-thread" on a thread that never saw it
        if mode == "worker-thread":
            thread = threading.Thread(target=loss.backward)
            thread.start()
            thread.join()
        else:
            loss.backward()
        return grads(model)

    reference, checkpointed = run(False), run(True)
    assert reference.keys() == checkpointed.keys()
    assert any("group_bias" in n for n in reference)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)


def test_checkpoint_replay_without_groups_would_differ(batch):
    """Guard for the test above: routing with and without the groups really differs."""
    ids, mask = batch
    model = group_routed()
    with torch.no_grad():
        with routing_context(groups_for(ids)):
            a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-3


GENERATE = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=0, eos_token_id=None)


def test_kv_cache_generation_of_a_batch_matches_its_rows_one_by_one():
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 6))
    groups, new_groups = torch.tensor([[0] * 6, [2] * 6]), torch.tensor([1, 2])
    model = group_routed()
    with generation_routing(model, groups, new_token_groups=new_groups):
        batched = model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
    for row in range(2):
        with generation_routing(model, groups[row:row + 1], new_token_groups=new_groups[row:row + 1]):
            single = model.generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[row:row + 1]), **GENERATE)
        assert torch.equal(batched.sequences[row], single.sequences[0])
        for step_b, step_s in zip(batched.scores, single.scores):
            torch.testing.assert_close(step_b[row], step_s[0], rtol=1e-4, atol=1e-4)
    without = model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
    assert not all(torch.allclose(a, b) for a, b in zip(without.scores, batched.scores))


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_tokens_route_by_their_rows_new_group(use_cache):
    """Reference: one forward over prompt + generated tokens, with the prompt's groups and the row's
    new-token group after it, predicts every generated token (greedy) with the same scores; with
    and without a KV cache (without, each forward re-reads the prompt)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    groups, new_groups = groups_for(ids)[:, :6], torch.tensor([1, 0])
    model = group_routed()
    with generation_routing(model, groups, mask.bool(), new_token_groups=new_groups):
        out = model.generate(ids, attention_mask=mask, use_cache=use_cache, **GENERATE)
    full = out.sequences
    full_groups = torch.cat([groups, new_groups[:, None].expand(2, 8)], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    with routing_context(full_groups[:, :-1], full_mask[:, :-1].bool()), torch.no_grad():
        logits = model(input_ids=full[:, :-1], attention_mask=full_mask[:, :-1]).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, logits[:, 5 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(do_sample=True, num_return_sequences=2)],
                         ids=["beam search", "sampling, 2 sequences"])
def test_expanded_rows_take_their_source_rows_groups(kwargs):
    """Every token the layers see is counted once per group: the prompt's tokens once per copy of
    their row, every new token of a row in that row's new-token group."""
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :1] = 0
    groups, new_groups = groups_for(ids)[:, :6], torch.tensor([0, 1])
    copies = kwargs.get("num_beams", kwargs.get("num_return_sequences"))
    model = group_routed()
    with generation_routing(model, groups, mask.bool(), new_token_groups=new_groups), record_routing(model) as record:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=None, **kwargs)
    expected = copies * torch.bincount(groups[mask.bool()], minlength=3).double()
    decode_steps = 4 - 1  # the prefill gives the first new token
    expected += copies * decode_steps * torch.bincount(new_groups, minlength=3).double()
    for stats in record.layers.values():
        assert torch.equal(stats.tokens, expected)


def test_generate_under_a_plain_prompt_context_is_a_clear_error():
    model = group_routed()
    ids = torch.randint(3, 128, (1, 6))
    with routing_context(torch.zeros_like(ids)), pytest.raises(ValueError, match="generation_routing"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)


def test_generation_routing_checks_its_inputs_and_leaves_nothing_behind():
    model = group_routed()
    ids = torch.randint(3, 128, (2, 6))
    with pytest.raises(ValueError, match="new_token_groups"):
        with generation_routing(model, torch.zeros_like(ids)):
            pass
    with pytest.raises(ValueError, match="new_token_groups without token_groups"):
        with generation_routing(model, None, torch.ones_like(ids).bool(), new_token_groups=1):
            pass
    seen = []
    layer = next(iter(adapter_layers(model).values()))
    layer.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(current_routing())))
    with pytest.raises(RuntimeError, match="stop"):
        with generation_routing(model, torch.zeros_like(ids), new_token_groups=1):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=0)
            raise RuntimeError("stop")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert current_routing() is None
    gc.collect()
    assert len(seen) == 3 and all(ref() is None for ref in seen)  # a prefill and two decode steps


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant", "context_fn", "worker-thread"])
def test_nothing_of_a_closed_context_outlives_the_backward(mode, batch):
    """Layers never hold the context object; the groups a replay needs go with the backward
    (`context_fn`: the checkpoint keeps the context until backward releases its saved tensors) or
    with the graph: the groups and mask a replay without a context would use live in the autograd
    graph, which goes with its last tensor (reentrant: the replay uses them up)."""
    ids, mask = batch
    model = group_routed(balance_weight=0.0 if mode == "reentrant" else 0.1)
    model.train()
    kwargs = {"use_reentrant": mode == "reentrant"}
    if mode == "context_fn":
        kwargs["context_fn"] = checkpoint_context_fn
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    groups, token_mask = groups_for(ids), mask.bool()
    refs = [weakref.ref(groups), weakref.ref(token_mask)]
    with routing_context(groups, token_mask) as inputs:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss + collect_aux_loss(model)
    refs.append(weakref.ref(inputs))
    del inputs, groups, token_mask
    gc.collect()
    assert (refs[-1]() is None) == (mode != "context_fn")  # the context object: gone with the block
    if mode == "worker-thread":
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    else:
        loss.backward()
    gc.collect()
    assert refs[-1]() is None
    if mode != "reentrant":
        del loss  # the graph (and what it keeps for replays) goes with its last tensor
        gc.collect()
    assert all(ref() is None for ref in refs)


def test_balance_loss_ignores_padding_and_follows_real_tokens(batch):
    ids, mask = batch
    model = group_routed(balance_weight=1.0)

    def aux(token_ids):
        with routing_context(groups_for(token_ids), mask.bool()):
            model(input_ids=token_ids, attention_mask=mask)
        return collect_aux_loss(model)

    reference = aux(ids)
    assert reference > 0
    repadded = ids.clone()
    repadded[1, :4] = (ids[1, :4] + 17) % 128  # change only padded tokens
    torch.testing.assert_close(aux(repadded), reference, rtol=1e-6, atol=0)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 17) % 128  # change a real token
    assert not torch.allclose(aux(changed), reference, rtol=1e-6, atol=0)
    with torch.no_grad():
        model(input_ids=ids)
    assert collect_aux_loss(model) == 0  # no-grad forwards leave no loss behind


def test_balance_loss_is_the_spread_of_mean_usage():
    weights = torch.tensor([[2.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    assert balance_loss(weights, torch.tensor([True, True, False])) == 0
    usage = torch.tensor([1.0, 3.0])
    assert balance_loss(torch.tensor([[1.0, 3.0]]), None) == ((usage - 2) ** 2).mean()


def test_aux_loss_is_a_weighted_mean_over_layers(batch):
    ids, mask = batch
    model = group_routed(balance_weight=0.25)
    model(input_ids=ids, attention_mask=mask)
    losses = [layer.balance_loss for layer in adapter_layers(model).values()]
    torch.testing.assert_close(collect_aux_loss(model), 0.25 * torch.stack(losses).mean())
    # collecting releases the layers' references (each holds the forward's graph alive)
    assert all(layer.balance_loss is None for layer in adapter_layers(model).values())
    assert collect_aux_loss(model) == 0
    assert collect_aux_loss(adapted(method="lora")) == 0


def test_recorder_counts_every_real_token_once_per_group_in_every_layer(batch):
    ids, mask = batch
    model = group_routed(competition=False)  # w = k * phi then sums to k exactly
    groups = groups_for(ids)
    with torch.no_grad(), record_routing(model) as record:
        with routing_context(groups, mask.bool()):
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)
    expected = torch.bincount(groups[mask.bool()], minlength=3).double() * 2
    assert record.layers.keys() == adapter_layers(model).keys()
    for stats in record.layers.values():
        assert torch.equal(stats.tokens, expected)
        summary = stats.summary()
        for g, entry in summary.items():
            assert abs(sum(entry["mean_router_prob"]) - 1) < 1e-6
            assert abs(sum(entry["mean_weight"]) - 4) < 1e-5
            assert abs(sum(entry["top1_share"]) - 1) < 1e-9
    assert all(layer.recorder is None for layer in adapter_layers(model).values())


def test_js_divergence_bounds():
    from mm_teamlora.adapters.routing import js_divergence
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert js_divergence(p, p) == 0
    assert abs(js_divergence(p, torch.tensor([0.0, 0.0, 0.5, 0.5])) - 1.0) < 1e-12
    assert 0 < js_divergence(p, torch.tensor([0.25, 0.25, 0.25, 0.25])) < 1
