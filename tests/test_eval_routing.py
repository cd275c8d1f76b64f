"""Routing analysis: JSON shapes, token accounting by group, separation maths, heatmaps."""

import json
import math
import os

import pytest
import torch

from fixtures.eval.helpers import SMALL_TSV, routed_tiny_model
from mm_teamlora.data.errors import DataError
from mm_teamlora import cli
from mm_teamlora.eval.routing import inspect_routing
from mm_teamlora.eval.separation import mutual_information_bits, separation

LLAVA_JSON = os.path.join(os.path.dirname(__file__), "fixtures", "data", "llava_small.json")


@pytest.fixture(scope="module")
def model():
    return routed_tiny_model()


def real_tokens(model, path):
    """Real tokens the model sees for the conversation file, counted independently of the recorder."""
    from mm_teamlora.data.sources import parse_record, read_records
    from mm_teamlora.data.templates import ConversationTemplate, sequence_length

    template = ConversationTemplate("chat", model.tokenizer)
    total = 0
    for raw in read_records(path):
        ids = template.encode([parse_record(raw.value, "llava", raw.index).messages])[0][0]
        total += sequence_length(ids, model.image_token_count)
    return total


def test_conversation_json_routing_shapes_and_group_counts_add_up(model, tmp_path):
    result = inspect_routing(model, LLAVA_JSON, str(tmp_path), batch_size=3)
    on_disk = json.loads((tmp_path / "routing.json").read_text())
    assert on_disk["tokens"] == result["tokens"] and on_disk["format"] == "mm_teamlora.routing/1"
    total = real_tokens(model, LLAVA_JSON)
    assert result["tokens"]["total"] == total
    assert set(result["tokens"]["by_group"]) == {"image", "text_with_image", "text_only"}
    assert result["tokens"]["by_group"]["image"] % model.image_token_count == 0
    assert len(result["layers"]) == 14  # 2 Llama layers x 7 linear layers
    for name, layer in result["layers"].items():
        assert layer["num_experts"] == 4
        counts = {g: v["tokens"] for g, v in layer["groups"].items()}
        assert counts == result["tokens"]["by_group"] and sum(counts.values()) == total
        for group in layer["groups"].values():
            assert len(group["mean_router_prob"]) == len(group["mean_weight"]) == len(group["top1_share"]) == 4
            assert sum(group["mean_router_prob"]) == pytest.approx(1.0)
            assert sum(group["top1_share"]) == pytest.approx(1.0)
        sep = layer["separation"]
        assert sep["headline"] == "image_vs_text_only"
        assert set(sep["js_bits"]) == {"image_vs_text_only", "text_with_image_vs_text_only",
                                       "image_vs_text_with_image", "image_grounded_vs_text_only"}
        assert all(0 <= v <= 1 for v in sep["js_bits"].values())
        assert 0 <= sep["mi_soft_bits"] <= sep["modality_entropy_bits"] + 1e-9
    assert any(layer["separation"]["headline_js_bits"] > 1e-3 for layer in result["layers"].values())
    # categories: the fixture has none, so everything is under "all", equal to the overall section
    assert list(result["by_category"]) == ["all"] and result["by_category"]["all"]["tokens"] == result["tokens"]
    assert set(result["plots"]) >= {"routing_image.png", "routing_text_only.png",
                                    "routing_diff_image_vs_text_only.png", "routing_separation.png"}
    for name in result["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mmbench_tsv_routing_by_category(model, tmp_path):
    result = inspect_routing(model, SMALL_TSV, str(tmp_path), batch_size=2, plots=False)
    assert set(result["by_category"]) == {"color_recognition", "shape_recognition", "counting"}
    assert result["samples"] == 5 and "text_only" not in result["tokens"]["by_group"]
    assert result["tokens"]["by_group"]["image"] == 5 * model.image_token_count
    for layer_name, layer in result["layers"].items():
        per_category = [c["layers"][layer_name]["groups"]["image"]["tokens"] for c in result["by_category"].values()]
        assert sum(per_category) == layer["groups"]["image"]["tokens"]
        assert layer["separation"]["headline"] == "image_vs_text_with_image"
    assert sum(c["tokens"]["total"] for c in result["by_category"].values()) == result["tokens"]["total"]
    assert "plots" not in result and not list(tmp_path.glob("*.png"))


def test_separation_maths_on_known_tables():
    # two groups routed to disjoint experts: JS = 1 bit, MI = H(G)
    parts = {"tokens": torch.tensor([10.0, 0.0, 30.0], dtype=torch.float64),
             "prob": torch.tensor([[10.0, 0, 0], [0, 0, 0], [0, 15.0, 15.0]], dtype=torch.float64),
             "weight": torch.zeros(3, 3, dtype=torch.float64),
             "top1": torch.tensor([[10.0, 0, 0], [0, 0, 0], [0, 30.0, 0]], dtype=torch.float64)}
    sep = separation(parts)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert sep["js_bits"]["image_vs_text_only"] == pytest.approx(1.0)
    assert sep["mi_soft_bits"] == pytest.approx(h) and sep["mi_top1_bits"] == pytest.approx(h)
    assert sep["modality_entropy_bits"] == pytest.approx(h)
    # identical routing in every group: no separation
    same = torch.tensor([[2.0, 6.0], [1.0, 3.0]], dtype=torch.float64)
    assert mutual_information_bits(same) == pytest.approx(0.0, abs=1e-12)
    sep = separation({"tokens": same.sum(1), "prob": same, "weight": same, "top1": same})
    assert sep["js_bits"]["image_vs_text_with_image"] == pytest.approx(0.0, abs=1e-12)
    assert sep["headline"] == "image_vs_text_with_image"


def test_routing_needs_a_routed_adapter_and_the_command_reports_it(tmp_path, capsys):
    code = cli.inspect_routing(model="tiny-random", data=SMALL_TSV, out=str(tmp_path), device="cpu")
    assert code == 2 and "routed adapter" in capsys.readouterr().err


def test_conversation_categories_text_only_samples_and_bad_records(model, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (0, 128, 255)).save(tmp_path / "blue.png")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [{"id": "v", "image": "blue.png", "category": "vqa", "conversations": turn("<image>\nColour?", "Blue.")},
               {"id": "t", "category": "chat", "conversations": turn("Hello?", "Hi there.")},
               {"id": "gone", "image": "missing.png", "category": "vqa", "conversations": turn("<image>\nX?", "Y.")}]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="gone"):
        inspect_routing(model, str(tmp_path / "mix.json"), str(tmp_path / "a"), plots=False)
    result = inspect_routing(model, str(tmp_path / "mix.json"), str(tmp_path / "b"), on_error="skip", plots=False)
    assert result["skipped"] == {"image_missing": 1} and result["samples"] == 2
    assert set(result["by_category"]["chat"]["tokens"]["by_group"]) == {"text_only"}
    assert set(result["by_category"]["vqa"]["tokens"]["by_group"]) == {"image", "text_with_image"}
    assert result["by_category"]["vqa"]["tokens"]["by_group"]["image"] == model.image_token_count


def test_plots_of_a_30_block_model_stay_readable_sizes(tmp_path):
    """210 adapted layers (SmolLM2's 30 blocks x 7): figures are capped and label every n-th layer."""
    from PIL import Image

    from mm_teamlora.eval.plots import plot_routing

    group = {"tokens": 10, "mean_router_prob": [0.4, 0.3, 0.2, 0.1]}
    separation = {"headline": "image_vs_text_only", "js_bits": {"image_vs_text_only": 0.1},
                  "mi_soft_bits": 0.05, "mi_top1_bits": 0.2}
    layers = {f"model.layers.{b}.{name}": {"num_experts": 4, "groups": {"image": group, "text_only": group},
                                           "separation": separation}
              for b in range(30) for name in ("q", "k", "v", "o", "gate", "up", "down")}
    for path in plot_routing({"layers": layers}, str(tmp_path)):
        width, height = Image.open(path).size
        assert width <= 16 * 110 and height <= 18 * 110, (path, width, height)
