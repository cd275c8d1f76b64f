"""Building the parts of a multimodal model from a `MultimodalConfig`: the frozen language model
and its tokenizer, the frozen vision tower, the projector (trainable), and the config as built
(the tower's token count recorded). `MultimodalLM` (multimodal.py) puts them together; this module
never imports it, so the arrow between the two runs one way.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import MultimodalConfig
from .projector import build_projector
from .vision import VisionTower, hf_vision_tower, load_hf_vision_tower, load_open_clip_tower


@dataclass
class ModelParts:
    language_model: nn.Module
    tokenizer: object
    vision_tower: VisionTower
    projector: nn.Module
    config: MultimodalConfig  # as built: image_token_count recorded, llava-hf layer choices resolved


def _language_model(config: MultimodalConfig, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import zoo
    from .llava import load_llava_hf, load_original_language_model

    kind, path = config.lm_kind, config.lm_path
    if kind == "preset":
        lm, tokenizer = zoo.preset_language_model(path, dtype)
        return lm, tokenizer, None
    if kind == "llava-hf":
        lm, vision_model, processor, projector_state, tokenizer, layer, feature = load_llava_hf(path, dtype)
        return lm, tokenizer, (vision_model, processor, projector_state, layer, feature)
    if kind == "llava":
        lm, tokenizer, _ = load_original_language_model(path, dtype)
        return lm, tokenizer, None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"language model folder not found: {path}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path), None


def build_parts(config: MultimodalConfig) -> ModelParts:
    """The parts `config` describes: frozen LM and tower, projector trainable."""
    from . import zoo

    dtype = config.torch_dtype
    lm, tokenizer, llava_parts = _language_model(config, dtype)
    projector_state = None
    if config.vision.kind == "llava-hf":
        vision_model, processor, projector_state, layer, feature = llava_parts
        vision_config = dataclasses.replace(config.vision, select_layer=layer, select_feature=feature)
        tower = hf_vision_tower(vision_model, processor, vision_config)
        config = dataclasses.replace(config, vision=vision_config)
    elif config.vision.kind == "preset":
        tower = zoo.preset_vision_tower(config.vision)
    elif config.vision.kind == "hf":
        tower = load_hf_vision_tower(config.vision)
    else:
        tower = load_open_clip_tower(config.vision)
    tower.to(dtype)
    lm_hidden = lm.get_input_embeddings().weight.shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        projector = build_projector(config.projector_type, tower.hidden_size, lm_hidden)
    if config.projector_init:
        from .llava import load_projector_bin

        projector_state = load_projector_bin(config.projector_init)
    if projector_state is not None:
        projector.load_state_dict({k: v.detach().float() for k, v in projector_state.items()}, strict=True)
    if config.image_token_count not in (None, tower.num_tokens):
        raise ValueError(f"config says {config.image_token_count} tokens per image but the tower gives {tower.num_tokens}")
    config = dataclasses.replace(config, image_token_count=tower.num_tokens)
    return ModelParts(lm, tokenizer, tower, projector.to(dtype), config)
