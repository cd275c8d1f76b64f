"""The LLaVA-style model around any HF causal LM: vision towers, projector, wrapper, presets."""

from .builder import MODEL_PRESETS, MultimodalConfig, build_multimodal, load_model, load_multimodal, save_multimodal
from .multimodal import MultimodalLM
from .projector import build_projector
from .tokenizer import tiny_tokenizer
from .vision import VisionTower, VisionTowerConfig

__all__ = ["MultimodalConfig", "MultimodalLM", "VisionTower", "VisionTowerConfig", "build_multimodal",
           "build_projector", "load_model", "load_multimodal", "MODEL_PRESETS", "save_multimodal", "tiny_tokenizer"]
