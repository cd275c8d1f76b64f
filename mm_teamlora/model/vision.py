"""Frozen vision towers that turn images into a fixed number of feature tokens.

Sources (`VisionTowerConfig.kind`, always explicit; nothing is guessed from a path):
- `hf`: a local Hugging Face folder holding a CLIP, SigLIP or DINOv2 model (`config.model_type`
  picks the class) and its image processor.
- `open_clip`: an open_clip architecture by name, weights from a local file (`path`) or, when none
  is given, random init (said plainly in the log).
- `llava-hf`: the vision tower inside a local llava-hf (`LlavaForConditionalGeneration`) folder.
- `preset`: a tower from `mm_teamlora.model.zoo`, by name (`path`).

Features are the hidden states of `select_layer` (LLaVA takes -2, the penultimate layer);
`select_feature` = `patch` drops the class token, `cls_patch` keeps it. `pool_to` optionally
average-pools the patch grid to a fixed square token count (short sequences on CPU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

HF_VISION_CLASSES = {  # config.model_type -> (transformers class name, has a class token)
    "clip": ("CLIPVisionModel", True),
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip": ("SiglipVisionModel", False),
    "siglip_vision_model": ("SiglipVisionModel", False),
    "dinov2": ("Dinov2Model", True),
}


VISION_KINDS = ("hf", "open_clip", "llava-hf", "preset")


@dataclass
class VisionTowerConfig:
    kind: str = "hf"  # hf | open_clip | llava-hf | preset
    path: str | None = None  # hf: model folder; open_clip: weights file (None = random init)
    arch: str | None = None  # open_clip architecture name, e.g. "ViT-B-32"
    select_layer: int = -2
    select_feature: str = "patch"  # patch | cls_patch
    pool_to: int | None = None  # square number of tokens per image after pooling, or None
    pad_to_square: bool = True  # LLaVA-1.5's "pad" aspect mode: pad with the mean colour, then resize

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision kind={self.kind!r}; allowed: {', '.join(VISION_KINDS)}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature={self.select_feature!r}; allowed: patch, cls_patch")
        if self.pool_to is not None and (self.pool_to < 1 or math.isqrt(self.pool_to) ** 2 != self.pool_to):
            raise ValueError(f"pool_to={self.pool_to}; must be a square number of tokens (e.g. 16, 64, 144)")
        if self.kind == "open_clip" and not self.arch:
            raise ValueError("an open_clip vision tower needs arch (e.g. 'ViT-B-32')")
        if self.kind in ("hf", "llava-hf", "preset") and not self.path:
            raise ValueError(f"a {self.kind} vision tower needs path (a local folder, or the preset's name)")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class VisionTower(nn.Module):
    """A frozen encoder: `forward(pixel_values (N, C, H, W)) -> (N, num_tokens, hidden_size)`.

    `encode_hidden` maps pixels to the list of per-layer hidden states (batch, tokens, dim) with
    `has_cls` saying whether token 0 is a class token; `preprocess` maps an RGB PIL image to a
    (C, H, W) tensor."""

    def __init__(self, encoder: nn.Module, encode_hidden: Callable, preprocess: Callable, hidden_size: int,
                 patch_grid: int, has_cls: bool, config: VisionTowerConfig, image_mean=(0.5, 0.5, 0.5)):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self._encode_hidden = encode_hidden
        self._preprocess = preprocess
        self.hidden_size = hidden_size
        self.patch_grid = patch_grid
        self.has_cls = has_cls
        self.config = config
        self._fill = tuple(int(255 * m) for m in image_mean)
        if config.select_feature == "cls_patch" and not has_cls:
            raise ValueError("select_feature='cls_patch' needs a tower with a class token (SigLIP has none)")
        if config.select_feature == "cls_patch" and config.pool_to:
            raise ValueError("pool_to pools the patch grid; it cannot be combined with select_feature='cls_patch'")

    @property
    def num_tokens(self) -> int:
        if self.config.pool_to:
            return self.config.pool_to
        return self.patch_grid**2 + (1 if self.config.select_feature == "cls_patch" else 0)

    def train(self, mode: bool = True):  # the encoder stays in eval mode (frozen, no dropout)
        super().train(mode)
        self.encoder.eval()
        return self

    def blank_pixels(self) -> torch.Tensor:
        """(1, C, H, W): a mid-grey image as `preprocess` makes it, for a forward whose output is
        discarded (see `MultimodalLM.vision_on_every_batch`)."""
        if getattr(self, "_blank", None) is None:
            self._blank = self.preprocess(Image.new("RGB", (64, 64), (128, 128, 128)))[None]
        return self._blank

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.config.pad_to_square:
            image = pad_to_square(image, self._fill)
        return self._preprocess(image)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self._encode_hidden(pixel_values)[self.config.select_layer]
        if self.config.select_feature == "cls_patch":
            return hidden
        patches = hidden[:, 1:] if self.has_cls else hidden
        if self.config.pool_to:
            n, tokens, dim = patches.shape
            grid = math.isqrt(tokens)
            side = math.isqrt(self.config.pool_to)
            patches = patches.transpose(1, 2).reshape(n, dim, grid, grid)
            patches = F.adaptive_avg_pool2d(patches.float(), side).to(hidden.dtype).flatten(2).transpose(1, 2)
        return patches


def hf_vision_tower(model: nn.Module, processor, config: VisionTowerConfig) -> VisionTower:
    """Wrap an HF CLIP / SigLIP / DINOv2 vision model and its image processor."""
    model_type = model.config.model_type
    if model_type not in HF_VISION_CLASSES:
        raise ValueError(f"unsupported HF vision model_type {model_type!r}; supported: {sorted(HF_VISION_CLASSES)}")
    has_cls = HF_VISION_CLASSES[model_type][1]
    vision_config = model.config
    grid = vision_config.image_size // vision_config.patch_size

    def encode_hidden(pixel_values):
        dtype = next(model.parameters()).dtype
        return model(pixel_values=pixel_values.to(dtype), output_hidden_states=True).hidden_states

    def preprocess(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return VisionTower(model, encode_hidden, preprocess, vision_config.hidden_size, grid, has_cls, config, mean)


def load_hf_vision_tower(config: VisionTowerConfig) -> VisionTower:
    import os

    import transformers

    if not os.path.isdir(config.path):
        raise FileNotFoundError(f"vision tower folder not found: {config.path}")
    model_config = transformers.AutoConfig.from_pretrained(config.path)
    if model_config.model_type not in HF_VISION_CLASSES:
        raise ValueError(f"{config.path}: model_type {model_config.model_type!r} is not a supported vision model "
                         f"({sorted(HF_VISION_CLASSES)})")
    model_class = getattr(transformers, HF_VISION_CLASSES[model_config.model_type][0])
    model = model_class.from_pretrained(config.path)
    if model.config.model_type == "dinov2" and getattr(model.config, "num_register_tokens", 0):
        raise ValueError(f"{config.path}: DINOv2 with register tokens is not supported yet")
    processor = transformers.AutoImageProcessor.from_pretrained(config.path)
    return hf_vision_tower(model, processor, config)


def load_open_clip_tower(config: VisionTowerConfig) -> VisionTower:
    import os

    import open_clip

    if config.path is None:
        logger.warning("open_clip %s: no weights file given, the vision tower is RANDOMLY INITIALISED", config.arch)
    elif not os.path.isfile(config.path):
        raise FileNotFoundError(f"open_clip weights file not found: {config.path}")
    model = open_clip.create_model(config.arch, pretrained=config.path)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "patch_size"):
        raise ValueError(f"open_clip {config.arch}: only ViT image towers are supported")
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    layers = len(visual.transformer.resblocks)
    index = config.select_layer % layers

    def encode_hidden(pixel_values):
        out = visual.forward_intermediates(pixel_values, indices=[index], stop_early=True, output_fmt="NLC",
                                           output_extra_tokens=True, intermediates_only=True)
        tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        hidden = [None] * layers
        hidden[index] = tokens
        return hidden

    mean = visual.preprocess_cfg.get("mean") if hasattr(visual, "preprocess_cfg") else None
    std = visual.preprocess_cfg.get("std") if hasattr(visual, "preprocess_cfg") else None
    preprocess = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    width = visual.transformer.width
    return VisionTower(visual, encode_hidden, preprocess, width, size // patch, True, config,
                       mean or open_clip.OPENAI_DATASET_MEAN)

