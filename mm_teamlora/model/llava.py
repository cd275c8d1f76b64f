"""Starting from an existing LLaVA-1.5 model, in either of its two layouts.

- llava-hf: a local folder of transformers' `LlavaForConditionalGeneration`. Its language model,
  vision tower and projector are taken over as modules (no copies); `vision_feature_layer` and
  `vision_feature_select_strategy` become the tower's select_layer / select_feature.
- original (haotian-liu/LLaVA): a language-model folder (a Llama checkpoint, possibly with
  `model_type: llava` and `mm_*` keys), `mm_projector.bin` (keys `[model.]mm_projector.{0,2}.*`)
  and a vision tower folder (HF CLIP).
"""

from __future__ import annotations

import json
import os

import torch


def load_llava_hf(path: str, dtype: torch.dtype):
    """(causal LM, vision model, image processor, projector state dict in `mlp2x_gelu` layout, tokenizer,
    select_layer, select_feature)."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    if not os.path.isdir(path):
        raise FileNotFoundError(f"llava-hf folder not found: {path}")
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    with torch.device("meta"):  # an empty causal-LM shell; its parts are replaced by llava's own
        lm = AutoModelForCausalLM.from_config(llava.config.text_config)
    lm.model = llava.model.language_model
    lm.lm_head = llava.lm_head
    lm.generation_config = llava.generation_config
    projector = llava.model.multi_modal_projector
    if getattr(projector, "linear_2", None) is None:
        raise ValueError(f"{path}: only the two-layer (mlp2x_gelu) LLaVA projector is supported")
    state = {"0.weight": projector.linear_1.weight, "0.bias": projector.linear_1.bias,
             "2.weight": projector.linear_2.weight, "2.bias": projector.linear_2.bias}
    layer = llava.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{path}: vision_feature_layer {layer!r}: only one layer is supported")
    feature = {"default": "patch", "full": "cls_patch"}[llava.config.vision_feature_select_strategy]
    return (lm.to(dtype), llava.model.vision_tower, AutoImageProcessor.from_pretrained(path), state,
            AutoTokenizer.from_pretrained(path), layer, feature)


def load_projector_bin(path: str) -> dict[str, torch.Tensor]:
    """LLaVA's `mm_projector.bin` as a state dict for our projector (`0.*`, `2.*` or `weight/bias`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"projector weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key, value in state.items():
        short = key.split("mm_projector.", 1)[-1]
        if short == key and "mm_projector" not in key:
            raise ValueError(f"{path}: unexpected key {key!r}; expected mm_projector.* tensors")
        out[short] = value
    return out


def load_original_language_model(path: str, dtype: torch.dtype):
    """A LLaVA LM folder; `model_type: llava` (LlavaLlamaForCausalLM) loads as a plain Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"language model folder not found: {path}")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") == "llava":
        config = LlamaConfig(**{k: v for k, v in raw.items() if not k.startswith("mm_") and k != "model_type"})
        model = LlamaForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    mm = {k: v for k, v in raw.items() if k.startswith("mm_")}
    return model, AutoTokenizer.from_pretrained(path), mm
