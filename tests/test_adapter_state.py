"""Save/load round trips (ours and peft's layout), merging and the parameter report."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mm_teamlora.adapters import (adapter_layers, adapter_state_dict, load_adapter,
                                  merge_adapters, routing_context, save_adapter, trainable_parameter_report)
from conftest import tiny_model
from helpers import adapted, randomize_adapters

METHODS = ["lora", "moelora", "hydralora", "teamlora"]


def perturb_everything_trainable(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_round_trip_into_a_base_model_gives_identical_logits(family, method, batch, tmp_path):
    ids, mask = batch
    groups = (ids % 3)
    model = adapted(family, method=method, group_routing=method != "lora", modules_to_save=["lm_head"])
    perturb_everything_trainable(model)
    with torch.no_grad(), routing_context(groups, mask.bool()):
        expected = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in saved)
    assert set(saved) == set(adapter_state_dict(model))
    assert any(k.startswith("lm_head.") for k in saved)

    fresh = tiny_model(family)  # same seed: same frozen weights, adapter not applied yet
    load_adapter(fresh, tmp_path)
    with torch.no_grad(), routing_context(groups, mask.bool()):
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, expected)
    again = adapted(family, method=method, group_routing=method != "lora", modules_to_save=["lm_head"])
    load_adapter(again, tmp_path)  # an already adapted model
    with torch.no_grad(), routing_context(groups, mask.bool()):
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)


def test_load_refuses_mismatches_clearly(tmp_path):
    model = adapted(method="teamlora", r=8)
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="r: model 16 vs saved 8"):
        load_adapter(adapted(method="teamlora", r=16), tmp_path)
    with pytest.raises(ValueError, match="method"):
        load_adapter(adapted(method="lora", r=8), tmp_path)
    # a tensor renamed and one reshaped in the file itself
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lora_A"))
    state["renamed." + key] = state.pop(key)
    from safetensors.torch import save_file
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\).*unexpected \(1\)"):
        load_adapter(tiny_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter config"):
        load_adapter(tiny_model(), tmp_path / "nowhere")


def test_state_dict_has_only_adapter_and_saved_tensors():
    model = adapted(method="teamlora", modules_to_save=["norm"], group_routing=True)
    keys = set(adapter_state_dict(model))
    suffixes = {k.rsplit(".", 1)[-1] for k in keys}
    assert suffixes == {"lora_A", "lora_B", "router", "competition", "group_bias", "weight"}
    assert {k for k in keys if k.endswith("weight")} == {"model.norm.weight"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_in_peft_layout_loads_in_peft_with_the_same_logits(family, batch, tmp_path):
    from peft import PeftModel
    ids, mask = batch
    model = adapted(family, method="lora", r=4, alpha=8)
    perturb_everything_trainable(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(model, tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(tiny_model(family), tmp_path).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only plain LoRA"):
        save_adapter(adapted(method="teamlora"), tmp_path / "team", format="peft")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_is_exact_and_gives_a_plain_model(family, batch):
    ids, mask = batch
    model = adapted(family, method="lora")
    perturb_everything_trainable(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        merged = merge_adapters(model)
        assert not adapter_layers(merged)
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["moelora", "hydralora", "teamlora"])
def test_routed_merge_refuses_without_fixed_weights_and_matches_fixed_routing(method, batch):
    ids, mask = batch
    model = adapted(method=method)
    randomize_adapters(model)
    with pytest.raises(ValueError, match="computed per token by the router"):
        merge_adapters(model)
    k = 4
    # make the router output uniform so the forward itself uses fixed weights, then merge with them
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.router.zero_()
            if getattr(layer, "competition", None) is not None:
                layer.competition.zero_()
        expected = model(input_ids=ids, attention_mask=mask).logits
    uniform = [1.0] * k if method == "teamlora" else [1.0 / k] * k
    with torch.no_grad():
        merged = merge_adapters(model, expert_weights=uniform)
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5)


def test_parameter_report_counts_and_gains():
    model = adapted(method="teamlora", r=8, num_experts=4, alpha=16, modules_to_save=["norm"])
    report = trainable_parameter_report(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable == trainable == report.adapter + report.saved_modules
    assert report.saved_modules == 32
    assert 0 < report.trainable_percent < 100
    assert report.effective_gain == 16 / 2 and report.gain_vs_lora == 4
    assert report.gains_by_method == {"lora": 1.0, "moelora": 0.25, "hydralora": 1.0, "teamlora": 4.0}
    assert "4x a rank-r LoRA" in str(report)
    json.dumps(report.to_dict())


def test_saved_files_get_the_mode_of_an_ordinary_new_file(tmp_path):
    """safetensors creates files 0600; checkpoints must be readable like any file the user writes."""
    import os

    model = adapted(method="teamlora")
    save_adapter(model, tmp_path)
    (tmp_path / "probe").write_text("x")
    expected = os.stat(tmp_path / "probe").st_mode & 0o777
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name
