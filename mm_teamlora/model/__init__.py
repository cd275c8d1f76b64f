"""The LLaVA-style model around any HF causal LM: vision towers, projector, wrapper, presets."""

from .config import MODEL_PRESETS, MultimodalConfig
from .multimodal import MultimodalLM, load_model
from .projector import build_projector
from ..tiny_tokenizer import tiny_tokenizer
from .vision import VisionTower, VisionTowerConfig

__all__ = ["MultimodalConfig", "MultimodalLM", "VisionTower", "VisionTowerConfig", "build_projector", "load_model",
           "MODEL_PRESETS", "tiny_tokenizer"]
