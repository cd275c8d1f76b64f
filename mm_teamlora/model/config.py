"""`MultimodalConfig`: where every part of a multimodal model comes from, and the checkpoint's
file names. A checkpoint folder (written by `MultimodalLM.save_pretrained`) is self-describing:

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

from .projector import PROJECTOR_TYPES
from .vision import VisionTowerConfig

CONFIG_FILE, PROJECTOR_FILE = "mm_config.json", "projector.safetensors"
CONFIG_FORMAT = "mm_teamlora.multimodal/1"
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

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "format": CONFIG_FORMAT}

    @classmethod
    def from_dict(cls, data: dict) -> "MultimodalConfig":
        data = {k: v for k, v in data.items() if k != "format"}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MultimodalConfig: unknown keys {sorted(unknown)}; "
                             f"known: {sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**data)

    @classmethod
    def load(cls, directory: str) -> "MultimodalConfig":
        """The config of a model folder; a language model path written `./NAME` (an export that
        carries its own language model) is taken relative to that folder."""
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a mm_teamlora model folder")
        with open(path, encoding="utf-8") as f:
            config = cls.from_dict(json.load(f))
        if config.lm_path.startswith("./"):
            local = os.path.join(os.path.abspath(directory), config.lm_path[2:])
            config = dataclasses.replace(config, language_model=f"{config.lm_kind}:{local}")
        return config

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
    def preset(cls, name: str = "tiny-random", vision: dict | None = None, **kwargs) -> "MultimodalConfig":
        """A named whole model (see MODEL_PRESETS), e.g. the embedded default `smollm2-dinov2-small`.
        `vision` overrides fields of the preset's tower (e.g. `{"pool_to": 16}`); other keyword
        arguments are `MultimodalConfig` fields."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(MODEL_PRESETS)}")
        lm, tower, tower_options, _ = MODEL_PRESETS[name]
        options = {**tower_options, **(vision or {})}
        fixed = {"kind", "path"} & set(options)
        if fixed:
            raise ValueError(f"preset {name!r} fixes the vision tower's {sorted(fixed)}; override only its options")
        return cls(language_model=f"preset:{lm}", vision=VisionTowerConfig(kind="preset", path=tower, **options),
                   **kwargs)
