"""Named presets: models built in code from configs, reproducible from their name and seed.

`tiny-random`: the offline tiny tokenizer, a 2-layer Llama (hidden 64) and a 2-layer CLIP vision
tower (32 px images, 8 px patches: 16 image tokens), all randomly initialised from a fixed seed, so
a checkpoint that names the preset rebuilds exactly the same frozen weights. For tests and examples.
"""

from __future__ import annotations

import torch

from .tokenizer import tiny_tokenizer

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


PRESETS = {"tiny-random": "2-layer Llama + 2-layer CLIP, random weights, offline tokenizer (tests, examples)"}
