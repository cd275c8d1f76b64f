"""`mm-teamlora export CHECKPOINT --out DIR [--merge | --peft]`: a folder that stands on its own.

- default: the checkpoint's model files without `trainer_state/` (kilobytes to megabytes), loadable
  with `MultimodalLM.from_pretrained` / `mm-teamlora eval --model DIR`;
- `--merge`: the adapters folded into the language model's weights (exact for LoRA; routed methods
  are refused with the reason `merge_adapters` gives), written as a Hugging Face folder
  `DIR/language_model` that the exported `mm_config.json` names relative to DIR, plus the projector:
  no adapter code is needed to run it;
- `--peft`: a plain LoRA adapter in peft's layout (`PeftModel.from_pretrained(base_lm, DIR)`), with
  the projector and the base model's `mm_config.json` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from ..adapters import adapter_config, adapter_layers, merge_adapters, save_adapter
from ..files import atomic_folder, atomic_write_text
from ..model import MultimodalConfig, MultimodalLM
from ..model.config import CONFIG_FILE, PROJECTOR_FILE

MODES = ("copy", "merge", "peft")
MERGED_LM = "language_model"


def export_checkpoint(checkpoint: str, out: str, mode: str = "copy") -> str:
    """Write the export of `checkpoint` into `out` (which must not exist yet; written whole)."""
    if mode not in MODES:
        raise ValueError(f"export mode {mode!r}; allowed: {', '.join(MODES)}")
    if not os.path.isfile(os.path.join(checkpoint, CONFIG_FILE)):
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no {CONFIG_FILE})")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; export into a new folder")
    model = MultimodalLM.from_pretrained(checkpoint)
    has_adapters = bool(adapter_layers(model.language_model))
    if mode == "merge" and has_adapters:
        merge_adapters(model.language_model)  # refuses routed methods, saying why
    if mode == "peft" and (not has_adapters or adapter_config(model.language_model).method != "lora"):
        raise ValueError("--peft exports plain LoRA adapters (peft has no MoELoRA, HydraLoRA or TeamLoRA); "
                         "use the default export, or --merge for LoRA")
    with atomic_folder(out) as tmp:
        if mode == "copy":
            for name in sorted(os.listdir(checkpoint)):
                if os.path.isfile(os.path.join(checkpoint, name)) and name.endswith((".json", ".safetensors")) \
                        and name != "trainer_state.json":
                    shutil.copy2(os.path.join(checkpoint, name), os.path.join(tmp, name))
        elif mode == "merge":
            model.language_model.save_pretrained(os.path.join(tmp, MERGED_LM))
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(os.path.join(tmp, MERGED_LM))
            config = dataclasses.replace(model.config, language_model=f"hf:./{MERGED_LM}")
            shutil.copy2(os.path.join(checkpoint, PROJECTOR_FILE), os.path.join(tmp, PROJECTOR_FILE))
            _write_config(tmp, config)
        else:
            save_adapter(model.language_model, tmp, format="peft", base_model_name_or_path=model.config.lm_path)
            shutil.copy2(os.path.join(checkpoint, PROJECTOR_FILE), os.path.join(tmp, PROJECTOR_FILE))
            _write_config(tmp, model.config)
    return out


def _write_config(folder: str, config: MultimodalConfig) -> None:
    atomic_write_text(os.path.join(folder, CONFIG_FILE), json.dumps(config.to_dict(), indent=2) + "\n")
