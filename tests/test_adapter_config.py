import json

import pytest

from mm_teamlora.adapters import AdapterConfig


def test_json_round_trip_keeps_every_field(tmp_path):
    config = AdapterConfig(method="hydralora", r=16, num_experts=2, alpha=8, dropout=0.1,
                           target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"],
                           modules_to_save=["norm"], competition=False, competition_norm="reference",
                           balance_weight=0.5, num_token_groups=5, group_routing=True,
                           implementation="loop", seed=7)
    assert AdapterConfig.from_json(config.to_json()) == config
    config.save(tmp_path)
    assert AdapterConfig.load(tmp_path) == config
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "hydralora"


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="moe"), "allowed: lora, moelora, hydralora, teamlora"),
    (dict(r=0), "positive integer"),
    (dict(r=10, num_experts=4), "not divisible"),
    (dict(method="moelora", r=10, num_experts=3), "not divisible"),
    (dict(num_experts=1), "at least 2"),
    (dict(alpha=0), "positive number"),
    (dict(dropout=1.0), "[0, 1)"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(target_modules=["q_proj", 3]), "list of non-empty strings"),
    (dict(competition_norm="softmax"), "allowed: l1, reference"),
    (dict(balance_weight=-1), ">= 0"),
    (dict(num_token_groups=0), "positive integer"),
    (dict(implementation="triton"), "allowed: fused, loop"),
    (dict(competition="yes"), "true or false"),
])
def test_bad_values_fail_at_construction_saying_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        AdapterConfig(**kwargs)


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        AdapterConfig.from_dict({"method": "lora", "rank": 8})


def test_lora_ignores_num_experts_and_rank_divisibility():
    config = AdapterConfig(method="lora", r=6, num_experts=4)
    assert config.experts == 1 and config.scaling == config.alpha / 6


def test_scalings_and_effective_gains_follow_the_spec():
    team = AdapterConfig(method="teamlora", r=64, num_experts=4, alpha=32)
    assert team.expert_rank == 16 and team.scaling == 2.0 and team.effective_gain == 2.0
    moe = AdapterConfig(method="moelora", r=64, num_experts=4, alpha=32)
    assert moe.scaling == 0.5 and moe.effective_gain == 0.125
    assert team.effective_gain / moe.effective_gain == 16  # k^2, the confound in TEAMLORA.md 4b
    assert AdapterConfig(method="hydralora", r=64, alpha=32).effective_gain == 0.5
    assert AdapterConfig(method="lora", r=64, alpha=32).effective_gain == 0.5
