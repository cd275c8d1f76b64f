"""Vision towers from local folders and open_clip, and both LLaVA-1.5 starting points."""

import json
import logging

import pytest
import torch

from mm_teamlora.constants import IMAGE_PLACEHOLDER_ID
from mm_teamlora.model import MultimodalConfig, MultimodalLM, VisionTowerConfig
from mm_teamlora.tiny_tokenizer import tiny_tokenizer
from mm_teamlora.model.vision import load_hf_vision_tower, load_open_clip_tower
from mm_teamlora.model.zoo import tiny_language_model, tiny_vision_model
from model_helpers import colour_image, make_batch

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4)


def save_hf_tower(kind: str, path):
    import transformers as t

    if kind == "clip":
        model, processor = t.CLIPVisionModel(t.CLIPVisionConfig(**TINY_VISION)), t.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "siglip":
        model, processor = t.SiglipVisionModel(t.SiglipVisionConfig(**TINY_VISION)), t.SiglipImageProcessor(
            size={"height": 32, "width": 32})
    else:
        model = t.Dinov2Model(t.Dinov2Config(**TINY_VISION))
        processor = t.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        do_center_crop=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind, has_cls", [("clip", True), ("siglip", False), ("dinov2", True)])
def test_hf_towers_from_local_folders_take_the_selected_layer(kind, has_cls, tmp_path):
    reference = save_hf_tower(kind, tmp_path)
    tower = load_hf_vision_tower(VisionTowerConfig(kind="hf", path=str(tmp_path), select_layer=-2))
    pixels = torch.stack([tower.preprocess(colour_image(s)) for s in (1, 2)])
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = tower(pixels)
    assert tower.num_tokens == 16 and features.shape == (2, 16, 32)
    assert torch.equal(features, hidden[:, 1:] if has_cls else hidden)
    assert not any(p.requires_grad for p in tower.parameters())
    if has_cls:
        full = load_hf_vision_tower(VisionTowerConfig(kind="hf", path=str(tmp_path), select_feature="cls_patch"))
        assert full.num_tokens == 17 and full(pixels).shape == (2, 17, 32)
    else:
        with pytest.raises(ValueError, match="class token"):
            load_hf_vision_tower(VisionTowerConfig(kind="hf", path=str(tmp_path), select_feature="cls_patch"))


def test_pooling_to_a_fixed_token_count(tmp_path):
    save_hf_tower("clip", tmp_path)
    full = load_hf_vision_tower(VisionTowerConfig(kind="hf", path=str(tmp_path)))
    pooled = load_hf_vision_tower(VisionTowerConfig(kind="hf", path=str(tmp_path), pool_to=4))
    pixels = torch.stack([full.preprocess(colour_image(3))])
    grid = full(pixels).reshape(1, 4, 4, 32)
    expected = grid.reshape(1, 2, 2, 2, 2, 32).mean(dim=(2, 4)).reshape(1, 4, 32)
    assert pooled.num_tokens == 4
    torch.testing.assert_close(pooled(pixels), expected)
    with pytest.raises(ValueError, match="square number"):
        VisionTowerConfig(kind="hf", path="x", pool_to=6)


def test_open_clip_tower_random_init_is_said_plainly(caplog):
    with caplog.at_level(logging.WARNING):
        tower = load_open_clip_tower(VisionTowerConfig(kind="open_clip", arch="ViT-S-32", pool_to=16))
    assert "RANDOMLY INITIALISED" in caplog.text
    pixels = tower.preprocess(colour_image(4, size=(300, 200)))[None]
    features = tower(pixels)
    assert features.shape == (1, 16, tower.hidden_size)
    with pytest.raises(FileNotFoundError, match="no-such-weights.bin"):
        load_open_clip_tower(VisionTowerConfig(kind="open_clip", arch="ViT-S-32", path="/no-such-weights.bin"))


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vision tower folder not found: /nowhere/clip"):
        MultimodalLM.from_config(MultimodalConfig(language_model="preset:tiny-random",
                                          vision=VisionTowerConfig(kind="hf", path="/nowhere/clip")))
    with pytest.raises(FileNotFoundError, match="language model folder not found: /nowhere/lm"):
        MultimodalLM.from_config(MultimodalConfig(language_model="hf:/nowhere/lm", vision=VisionTowerConfig(kind="preset", path="tiny-random")))
    with pytest.raises(ValueError, match="KIND:PATH"):
        MultimodalConfig(language_model="/models/lm", vision=VisionTowerConfig(kind="preset", path="tiny-random"))


def tiny_llava_hf(path):
    import transformers as t

    tokenizer = tiny_tokenizer()
    lm, _ = tiny_language_model(tokenizer)
    config = t.LlavaConfig(vision_config=t.CLIPVisionConfig(**TINY_VISION), text_config=lm.config,
                           image_token_index=len(tokenizer) - 1, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(5)
    llava = t.LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(path)
    tokenizer.save_pretrained(path)
    t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return llava


def test_llava_hf_folder_gives_the_same_logits_as_llava_itself(tmp_path):
    llava = tiny_llava_hf(tmp_path)
    model = MultimodalLM.from_config(MultimodalConfig.llava_hf(str(tmp_path)))
    assert model.image_token_count == 16 and model.config.vision.select_layer == -2
    ids, mask, pixels, counts = make_batch(model, ["Look <image> here"], [[7]])
    image_token = llava.config.image_token_index
    row = ids[0].tolist()
    p = row.index(IMAGE_PLACEHOLDER_ID)
    llava_ids = torch.tensor([row[:p] + [image_token] * 16 + row[p + 1:]])
    with torch.no_grad():
        expected = llava(input_ids=llava_ids, pixel_values=pixels).logits
        got = model(ids, mask, None, pixels, counts).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_original_llava_layout_loads_lm_projector_and_tower(tmp_path):

    lm, tokenizer = tiny_language_model()
    lm_dir, vision_dir = tmp_path / "lm", tmp_path / "vision"
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    raw = json.loads((lm_dir / "config.json").read_text())
    raw.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_vision_select_layer=-1,
               mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_hidden_size=32)
    (lm_dir / "config.json").write_text(json.dumps(raw))
    vision, processor = tiny_vision_model()
    vision.save_pretrained(vision_dir)
    processor.save_pretrained(vision_dir)
    projector = {"model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
                 "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
    torch.save(projector, tmp_path / "mm_projector.bin")

    model = MultimodalLM.from_config(MultimodalConfig.llava_original(str(lm_dir), str(tmp_path / "mm_projector.bin"),
                                                             str(vision_dir)))
    assert model.config.vision.select_layer == -1
    assert torch.equal(model.projector[0].weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(model.projector[2].bias, projector["model.mm_projector.2.bias"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model.language_model(ids).logits, lm(ids).logits)
