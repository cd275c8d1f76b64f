"""The LLaVA-style wrapper: splicing, modality ids, generation, checkpoints, checkpointing."""

import pytest
import torch

from mm_teamlora.adapters import AdapterConfig, adapter_layers, current_routing, record_routing, routing_context
from mm_teamlora.constants import (GROUP_IMAGE, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE, IGNORE_INDEX,
                                   IMAGE_PLACEHOLDER_ID)
from mm_teamlora.model import MultimodalConfig, MultimodalLM
from helpers import randomize_adapters
from model_helpers import colour_image, make_batch

TEXTS = ["Describe <image> briefly please.", "A text only question without pictures?", "<image> and <image> differ how?"]
IMAGES = [[1], [], [2, 3]]


@pytest.fixture(scope="module")
def base():
    return MultimodalLM.from_config(MultimodalConfig.preset())


def adapted_model(method="teamlora", group_routing=True):
    model = MultimodalLM.from_config(MultimodalConfig.preset())
    model.add_adapters(AdapterConfig(method=method, r=8, num_experts=4, dropout=0.0, group_routing=group_routing))
    randomize_adapters(model.language_model, seed=3, scale=0.5)
    return model


def test_splicing_positions_labels_and_groups_in_a_mixed_batch(base):
    ids, mask, pixels, counts = make_batch(base, TEXTS, IMAGES)
    labels = ids.masked_fill(ids == IMAGE_PLACEHOLDER_ID, IGNORE_INDEX).masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        out = base.build_inputs(ids, mask, labels, pixels, counts)
        features = base.encode_images(pixels)
        text_embeds = base.language_model.get_input_embeddings()(ids.clamp_min(0))
    n_img = base.image_token_count
    lengths = mask.sum(1) + counts * (n_img - 1)
    assert out["inputs_embeds"].shape[1] == int(lengths.max())
    assert out["attention_mask"].sum(1).tolist() == lengths.tolist()
    for b in range(3):
        row_ids = ids[b, mask[b].bool()].tolist()
        pos, image = 0, sum(len(s) for s in IMAGES[:b])
        for token_pos, token in enumerate(row_ids):
            if token == IMAGE_PLACEHOLDER_ID:
                span = slice(pos, pos + n_img)
                assert torch.equal(out["inputs_embeds"][b, span], features[image])
                assert (out["labels"][b, span] == IGNORE_INDEX).all()
                assert (out["token_groups"][b, span] == GROUP_IMAGE).all()
                image, pos = image + 1, pos + n_img
            else:
                assert torch.equal(out["inputs_embeds"][b, pos], text_embeds[b, token_pos])
                assert out["labels"][b, pos] == token
                assert out["token_groups"][b, pos] == (GROUP_TEXT_WITH_IMAGE if IMAGES[b] else GROUP_TEXT_ONLY)
                pos += 1
        assert (out["attention_mask"][b, pos:] == 0).all() and (out["labels"][b, pos:] == IGNORE_INDEX).all()


def test_placeholder_and_image_count_mismatches_name_the_sample(base):
    ids, mask, pixels, counts = make_batch(base, TEXTS, IMAGES)
    with pytest.raises(ValueError, match="sample 2: 2 <image> placeholders but 1 images"):
        base(ids, mask, None, pixels[:2], torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="need 3 images but 2 were given"):
        base(ids, mask, None, pixels[:2], counts)


def test_precomputed_image_features_give_the_same_logits(base):
    ids, mask, pixels, counts = make_batch(base, TEXTS, IMAGES)
    with torch.no_grad():
        expected = base(ids, mask, None, pixels, counts).logits
        features = base.encode_images(pixels)
        assert torch.equal(base(ids, mask, None, None, counts, image_features=features).logits, expected)


def test_text_only_batches_do_not_run_the_vision_tower_but_keep_the_projector_in_the_graph(base):
    calls = []
    handle = base.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids, mask, pixels, counts = make_batch(base, [TEXTS[1], "Another plain question"], [[], []])
        assert pixels is None
        out = base(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX), None, counts)
        out.loss.backward()
        assert calls == []
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in base.projector.parameters())
        ids, mask, pixels, counts = make_batch(base, TEXTS, IMAGES)
        with torch.no_grad():
            base(ids, mask, None, pixels, counts)
        assert calls == [1]  # one call for all images of the batch
    finally:
        handle.remove()
        base.projector.zero_grad(set_to_none=True)


def test_recorder_sees_every_modality_group_in_every_adapted_layer():
    model = adapted_model()
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES)
    with torch.no_grad(), record_routing(model.language_model) as record:
        model(ids, mask, None, pixels, counts)
    n_img = model.image_token_count
    text_with_image = int(mask[0].sum() - 1 + mask[2].sum() - 2)
    expected = {GROUP_IMAGE: 3 * n_img, GROUP_TEXT_WITH_IMAGE: text_with_image, GROUP_TEXT_ONLY: int(mask[1].sum())}
    assert record.layers.keys() == adapter_layers(model.language_model).keys()
    for stats in record.layers.values():
        assert {g: s["tokens"] for g, s in stats.summary().items()} == expected


@pytest.mark.parametrize("method", ["teamlora", "lora"])
def test_batched_generation_equals_one_by_one(method):
    model = adapted_model(method, group_routing=method == "teamlora").eval()
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES, padding_side="left")
    batched = model.generate(ids, mask, pixels, counts, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert batched.shape == (3, 10)
    for b in range(3):
        one_ids, one_mask, one_pixels, one_counts = make_batch(model, [TEXTS[b]], [IMAGES[b]], padding_side="left")
        single = model.generate(one_ids, one_mask, one_pixels, one_counts, max_new_tokens=10, do_sample=False,
                                eos_token_id=None)
        assert torch.equal(batched[b], single[0]), b


def test_generated_ids_feed_a_training_step_and_generation_follows_the_update():
    """generate runs under inference_mode but returns ordinary tensors, and its cached adapter
    matrices are rebuilt after an optimizer step."""
    model = adapted_model("teamlora", group_routing=True).eval()
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES, padding_side="left")
    new = model.generate(ids, mask, pixels, counts, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert not new.is_inference()
    full = torch.cat([ids, new], dim=1)
    model.train()
    loss = model(full, torch.cat([mask, torch.ones_like(new)], dim=1), full, pixels, counts).loss
    loss.backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=100.0)
    optimizer.step()
    model.eval()
    one = make_batch(model, TEXTS[:1], IMAGES[:1])  # one row: its last position is real
    logits = model(one[0], one[1], None, *one[2:]).logits[0, -1]  # with grad: no cached matrices
    after = model.generate(*one, max_new_tokens=1, do_sample=False, eos_token_id=None)
    assert after[0, 0] == logits.argmax()


def test_sampling_generation_is_seeded(base):
    ids, mask, pixels, counts = make_batch(base, TEXTS, IMAGES, padding_side="left")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(base.generate(ids, mask, pixels, counts, max_new_tokens=6, do_sample=True, temperature=1.0))
    assert torch.equal(*runs)


def test_save_and_load_give_identical_logits(tmp_path):
    model = adapted_model()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES)
    with torch.no_grad():
        expected = model(ids, mask, None, pixels, counts).logits
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"mm_config.json", "projector.safetensors", "adapter_config.json",
                                                   "adapter_model.safetensors"}
    loaded = MultimodalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, None, pixels, counts).logits, expected)
    assert loaded.config == model.config


def test_save_pretrained_writes_a_given_state_dict_and_refuses_unsharded_holes(tmp_path):
    """What a sharding engine does: it gathers the checkpoint tensors and hands them over."""
    model = adapted_model()
    state = model.checkpoint_state_dict()
    assert {k.split(".")[0] for k in state} == {"projector", "language_model"}
    assert all(p.requires_grad for p in state.values() if isinstance(p, torch.nn.Parameter))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(state)  # everything trained is saved
    gathered = {k: torch.full_like(v, 0.25) for k, v in state.items()}
    model.save_pretrained(tmp_path / "given", state_dict=gathered)
    loaded = MultimodalLM.from_pretrained(tmp_path / "given")
    assert all(torch.equal(v, gathered[k]) for k, v in loaded.checkpoint_state_dict().items())
    # what a ZeRO-3 shard looks like before it is gathered: refused, nothing half-useful written
    holes = {k: torch.empty(0) if "lora_B" in k else v for k, v in state.items()}
    with pytest.raises(ValueError, match="empty tensors .*gathered"):
        model.save_pretrained(tmp_path / "holes", state_dict=holes)
    assert not (tmp_path / "holes").exists()
    with pytest.raises(ValueError, match="missing"):
        model.save_pretrained(tmp_path / "partial", state_dict={k: v for k, v in state.items() if "projector" in k})


def test_preset_takes_vision_overrides():
    config = MultimodalConfig.preset("smollm2-dinov2-small", vision={"pool_to": 16}, seed=3)
    assert config.vision.pool_to == 16 and config.vision.path == "dinov2-small" and config.seed == 3
    with pytest.raises(ValueError, match="fixes the vision tower"):
        MultimodalConfig.preset("tiny-random", vision={"path": "elsewhere"})


def test_data_inputs_hand_the_dataset_what_it_needs():
    model = adapted_model()
    inputs = model.data_inputs()
    assert inputs["tokenizer"] is model.tokenizer and inputs["image_token_count"] == model.image_token_count
    assert inputs["image_processor"](colour_image(0)).shape[0] == 3


@pytest.mark.parametrize("ids_kind", ["mixed", "text-only"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(ids_kind):
    texts, images = (TEXTS, IMAGES) if ids_kind == "mixed" else ([TEXTS[1], "Plain words only"], [[], []])

    def grads(checkpointing):
        model = adapted_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        ids, mask, pixels, counts = make_batch(model, texts, images)
        labels = ids.masked_fill((ids == IMAGE_PLACEHOLDER_ID) | (mask == 0), IGNORE_INDEX)
        model(ids, mask, labels, pixels, counts).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference, checkpointed = grads(False), grads(True)
    assert reference.keys() == checkpointed.keys()
    assert any("lora_A" in n for n in reference) and any(n.startswith("projector.") for n in reference)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)


def test_adapters_go_on_the_language_model_only_and_bad_targets_are_clear():
    model = MultimodalLM.from_config(MultimodalConfig.preset())
    model.add_adapters(AdapterConfig(method="teamlora", r=8, num_experts=4))
    assert adapter_layers(model.language_model) and not adapter_layers(model.vision_tower)
    assert not adapter_layers(model.projector)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_model", "projector"}
    with pytest.raises(ValueError, match="matches no linear layer"):
        MultimodalLM.from_config(MultimodalConfig.preset()).add_adapters(AdapterConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="num_token_groups >= 3"):
        MultimodalLM.from_config(MultimodalConfig.preset()).add_adapters(AdapterConfig(group_routing=True, num_token_groups=2))


# -- generation: expanded rows, decode groups, nothing kept (issue 12, item 5) -------------------
def _generate_kwargs(**kwargs):
    return dict(max_new_tokens=5, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["single", "batched"])
def test_beam_search_of_a_batch_equals_its_rows_one_by_one(rows):
    """Beams are expanded rows: each routes by its source row, so a batch's beam search gives each
    row what that row alone gives (and a single row no longer trips over its 2 beams)."""
    model = adapted_model().eval()
    texts, images = [TEXTS[b] for b in rows], [IMAGES[b] for b in rows]
    ids, mask, pixels, counts = make_batch(model, texts, images, padding_side="left")
    batched = model.generate(ids, mask, pixels, counts, **_generate_kwargs(num_beams=2, do_sample=False))
    assert batched.shape == (len(rows), 5)
    for i, b in enumerate(rows):
        one = make_batch(model, [TEXTS[b]], [IMAGES[b]], padding_side="left")
        single = model.generate(*one, **_generate_kwargs(num_beams=2, do_sample=False))
        assert torch.equal(batched[i], single[0]), b


@pytest.mark.parametrize("rows", [[2], [0, 1, 2]], ids=["single", "batched"])
def test_sampled_sequences_route_like_their_prompt_repeated_by_hand(rows):
    """num_return_sequences=2 with a seed gives what the same seed gives for each prompt written
    twice in the batch: the copies take their source row's groups."""
    model = adapted_model().eval()
    texts, images = [TEXTS[b] for b in rows], [IMAGES[b] for b in rows]
    ids, mask, pixels, counts = make_batch(model, texts, images, padding_side="left")
    torch.manual_seed(0)
    expanded = model.generate(ids, mask, pixels, counts, **_generate_kwargs(do_sample=True, num_return_sequences=2))
    twice = [b for b in rows for _ in range(2)]
    by_hand = make_batch(model, [TEXTS[b] for b in twice], [IMAGES[b] for b in twice], padding_side="left")
    torch.manual_seed(0)
    reference = model.generate(*by_hand, **_generate_kwargs(do_sample=True))
    assert expanded.shape == (2 * len(rows), 5)
    assert torch.equal(expanded, reference)


def test_new_tokens_route_as_text_of_their_row():
    """Reference: one forward over prompt + answer, the answer's tokens tagged with the row's text
    group (text with image / text only), predicts every greedy token the generation made."""
    model = adapted_model().eval()
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES, padding_side="left")
    new = model.generate(ids, mask, pixels, counts, **_generate_kwargs(do_sample=False))
    with torch.no_grad():
        inputs = model.build_inputs(ids, mask, None, pixels, counts, padding_side="left")
        embeds = torch.cat([inputs["inputs_embeds"], model.language_model.get_input_embeddings()(new)], 1)[:, :-1]
        full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)[:, :-1]
        prompt = inputs["inputs_embeds"].shape[1]

        def predicted(answer_groups):
            groups = torch.cat([inputs["token_groups"], answer_groups[:, None].expand(3, 5)], dim=1)[:, :-1]
            with routing_context(groups, full_mask.bool()):
                logits = model.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
            return logits[:, prompt - 1:].argmax(-1)

        assert torch.equal(predicted(torch.tensor([GROUP_TEXT_WITH_IMAGE, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE])), new)
        assert not torch.equal(predicted(torch.full((3,), GROUP_IMAGE)), new)  # guard: the groups matter


def test_generate_keeps_no_routing_context_or_hook():
    import gc
    import weakref

    model = adapted_model().eval()
    seen = []
    layer = next(iter(adapter_layers(model.language_model).values()))
    layer.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(current_routing())))
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES, padding_side="left")
    model.generate(ids, mask, pixels, counts, **_generate_kwargs(num_beams=2, do_sample=False))
    gc.collect()
    assert len(seen) == 5 and all(ref() is None for ref in seen)
    assert not model.language_model._forward_pre_hooks and not model.language_model._forward_hooks
    assert current_routing() is None
