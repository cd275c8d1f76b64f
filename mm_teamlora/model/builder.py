"""`MultimodalConfig` says where every part of a model comes from; `build_multimodal` builds it,
`save_multimodal` / `load_multimodal` write and read a self-describing checkpoint folder:

    mm_config.json             this config (LM source, vision source and layer, projector type,
                               image token count)
    projector.safetensors      the projector
    adapter_config.json        the adapters on the language model, when there are any
    adapter_model.safetensors

Sources carry their kind explicitly (`language_model`: "hf:PATH", "llava-hf:PATH", "llava:PATH"
for the original LLaVA layout, or "preset:NAME"), so a checkpoint is rebuilt without guessing from
folder names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ..adapters import adapter_layers, load_adapter, save_adapter
from ..adapters.state import atomic_write, atomic_write_text
from .multimodal import MultimodalLM
from .projector import PROJECTOR_TYPES, build_projector
from .vision import VisionTowerConfig, hf_vision_tower, load_hf_vision_tower, load_open_clip_tower

CONFIG_FILE, PROJECTOR_FILE = "mm_config.json", "projector.safetensors"
LM_KINDS = ("hf", "llava-hf", "llava", "preset")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_PRESETS = {  # name: (language-model preset, vision preset, vision options, what it is)
    "tiny-random": ("tiny-random", "tiny-random", {}, "2-layer Llama + 2-layer CLIP, random (tests)"),
    "smollm2-dinov2-small": ("smollm2-135m-instruct", "dinov2-small", {"pool_to": 64},
                             "SmolLM2-135M-Instruct + DINOv2 ViT-S/14 (64 tokens per image): the embedded default"),
}


@dataclass
class MultimodalConfig:
    language_model: str  # "hf:PATH" | "llava-hf:PATH" | "llava:PATH" | "preset:NAME"
    vision: VisionTowerConfig
    projector_type: str = "mlp2x_gelu"
    projector_init: str | None = None  # LLaVA mm_projector.bin to start the projector from
    dtype: str = "float32"
    seed: int = 0  # projector initialisation
    image_token_count: int | None = None  # recorded at build; checked when a checkpoint is rebuilt

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionTowerConfig(**self.vision)
        kind, sep, path = self.language_model.partition(":")
        if not sep or kind not in LM_KINDS or not path:
            raise ValueError(f"language_model={self.language_model!r}; write KIND:PATH with KIND one of "
                             f"{', '.join(LM_KINDS)} (e.g. 'hf:/models/SmolLM2-135M-Instruct', 'preset:tiny-random')")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={self.projector_type!r}; allowed: {', '.join(PROJECTOR_TYPES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if kind == "llava-hf" and (self.vision.kind != "llava-hf" or self.vision.path != path):
            raise ValueError("a llava-hf language model takes its vision tower from the same folder: "
                             f"vision=VisionTowerConfig(kind='llava-hf', path={path!r})")

    @property
    def lm_kind(self) -> str:
        return self.language_model.partition(":")[0]

    @property
    def lm_path(self) -> str:
        return self.language_model.partition(":")[2]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "format": "mm_teamlora.multimodal/1"}

    @classmethod
    def from_dict(cls, data: dict) -> "MultimodalConfig":
        data = {k: v for k, v in data.items() if k != "format"}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MultimodalConfig: unknown keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def llava_hf(cls, path: str, **kwargs) -> "MultimodalConfig":
        return cls(language_model=f"llava-hf:{path}", vision=VisionTowerConfig(kind="llava-hf", path=path), **kwargs)

    @classmethod
    def llava_original(cls, lm_path: str, projector_bin: str, vision_path: str, **kwargs) -> "MultimodalConfig":
        """The original LLaVA layout; select layer and feature come from the LM config's mm_* keys."""
        with open(os.path.join(lm_path, "config.json")) as f:
            raw = json.load(f)
        vision = VisionTowerConfig(kind="hf", path=vision_path, select_layer=raw.get("mm_vision_select_layer", -2),
                                   select_feature=raw.get("mm_vision_select_feature", "patch"))
        return cls(language_model=f"llava:{lm_path}", vision=vision, projector_init=projector_bin,
                   projector_type=raw.get("mm_projector_type", "mlp2x_gelu"), **kwargs)

    @classmethod
    def preset(cls, name: str = "tiny-random", **kwargs) -> "MultimodalConfig":
        """A named whole model (see MODEL_PRESETS), e.g. the embedded default `smollm2-dinov2-small`."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(MODEL_PRESETS)}")
        lm, vision, vision_kwargs, _ = MODEL_PRESETS[name]
        return cls(language_model=f"preset:{lm}", vision=VisionTowerConfig(kind="preset", path=vision, **vision_kwargs),
                   **kwargs)


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


def build_multimodal(config: MultimodalConfig) -> MultimodalLM:
    """Build the model `config` describes: frozen LM and tower, projector trainable."""
    from . import zoo

    dtype = DTYPES[config.dtype]
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
    return MultimodalLM(lm, tower, projector.to(dtype), config, tokenizer)


def load_model(spec: str) -> MultimodalLM:
    """A model folder written by `save_multimodal`, or the name of a model preset."""
    if os.path.isfile(os.path.join(spec, CONFIG_FILE)):
        return load_multimodal(spec)
    if spec in MODEL_PRESETS:
        return build_multimodal(MultimodalConfig.preset(spec))
    raise FileNotFoundError(f"{spec!r} is neither a model folder (no {CONFIG_FILE} there) nor a preset "
                            f"({', '.join(MODEL_PRESETS)})")


def save_multimodal(model: MultimodalLM, directory: str) -> str:
    """Write config, projector and adapters (each file written whole, then renamed into place)."""
    os.makedirs(directory, exist_ok=True)
    projector = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    atomic_write(os.path.join(directory, PROJECTOR_FILE), lambda p: save_file(projector, p))
    if adapter_layers(model.language_model):
        save_adapter(model.language_model, directory)
    text = json.dumps(model.config.to_dict(), indent=2)
    atomic_write_text(os.path.join(directory, CONFIG_FILE), text + "\n")
    return directory


def load_multimodal(directory: str) -> MultimodalLM:
    """Rebuild a model from a folder written by `save_multimodal`."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a mm_teamlora model folder")
    with open(path) as f:
        config = MultimodalConfig.from_dict(json.load(f))
    model = build_multimodal(dataclasses.replace(config, projector_init=None))
    state = load_file(os.path.join(directory, PROJECTOR_FILE))
    model.projector.load_state_dict(state, strict=True)
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        load_adapter(model.language_model, directory)
    model.config = config
    return model
