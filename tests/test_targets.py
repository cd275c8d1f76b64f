"""Which layers get adapters: presets, names, regexes, exclusions and clear errors."""

import pytest
import torch

from mm_teamlora.adapters import AdapterConfig, adapter_layers, apply_adapters, find_targets
from conftest import tiny_model

LLAMA_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
LLAMA_MLP = {"gate_proj", "up_proj", "down_proj"}


def suffixes(model, **config):
    return {n.split(".")[-1] for n in find_targets(model, AdapterConfig(**config))}


def test_presets_on_llama():
    model = tiny_model("llama")
    assert suffixes(model, target_modules="attention") == LLAMA_ATTENTION
    assert suffixes(model, target_modules="mlp") == LLAMA_MLP
    assert suffixes(model, target_modules="all-linear") == LLAMA_ATTENTION | LLAMA_MLP


def test_presets_on_gpt2_conv1d():
    model = tiny_model("gpt2")
    attention = find_targets(model, AdapterConfig(target_modules="attention"))
    assert {n.split(".", 3)[-1] for n in attention} == {"attn.c_attn", "attn.c_proj"}
    mlp = find_targets(model, AdapterConfig(target_modules="mlp"))
    assert {n.split(".", 3)[-1] for n in mlp} == {"mlp.c_fc", "mlp.c_proj"}
    assert "lm_head" not in find_targets(model, AdapterConfig(target_modules="all-linear"))


def test_all_linear_never_includes_the_output_head_even_when_tied_or_renamed():
    model = tiny_model("llama")
    names = find_targets(model, AdapterConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7


def test_names_suffixes_regex_and_exclusions():
    model = tiny_model("llama")
    assert suffixes(model, target_modules=["q_proj", "self_attn.v_proj"]) == {"q_proj", "v_proj"}
    assert find_targets(model, AdapterConfig(target_modules=r"model\.layers\.1\..*_proj")) == [
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    names = find_targets(model, AdapterConfig(target_modules="mlp", exclude_modules=["layers.0.mlp.up_proj"]))
    assert "model.layers.0.mlp.up_proj" not in names and "model.layers.1.mlp.up_proj" in names
    # suffixes are whole components: "proj" is not a suffix of "q_proj"
    with pytest.raises(ValueError, match="matches no linear layer"):
        find_targets(model, AdapterConfig(target_modules=["proj"]))


def test_no_match_lists_the_linear_layer_names():
    with pytest.raises(ValueError) as info:
        apply_adapters(tiny_model("llama"), AdapterConfig(target_modules=["query"]))
    message = str(info.value)
    assert "matches no linear layer" in message and "'q_proj'" in message and "'down_proj'" in message


def test_non_linear_targets_and_double_application_are_errors():
    with pytest.raises(TypeError, match="Embedding"):
        apply_adapters(tiny_model("llama"), AdapterConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="neither a preset nor a valid regex"):
        find_targets(tiny_model("llama"), AdapterConfig(target_modules="q_proj("))
    model = apply_adapters(tiny_model("llama"), AdapterConfig(method="lora"))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig(method="lora"))
    with pytest.raises(ValueError, match="modules_to_save entries"):
        apply_adapters(tiny_model("llama"), AdapterConfig(modules_to_save=["projector"]))


def test_same_seed_same_adapter_any_order_of_models():
    a = apply_adapters(tiny_model("llama"), AdapterConfig(seed=3))
    b = apply_adapters(tiny_model("llama"), AdapterConfig(seed=3))
    c = apply_adapters(tiny_model("llama"), AdapterConfig(seed=4))
    la, lb, lc = (next(iter(adapter_layers(m).values())) for m in (a, b, c))
    assert torch.equal(la.lora_A, lb.lora_A) and not torch.equal(la.lora_A, lc.lora_A)
