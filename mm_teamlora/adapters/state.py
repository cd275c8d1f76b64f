"""Adapter state: state dicts, save/load (ours and peft's LoRA layout), merging, parameter report.

Layout written by `save_adapter(model, dir)`:
    dir/adapter_config.json        the AdapterConfig (JSON)
    dir/adapter_model.safetensors  adapter tensors and `modules_to_save` tensors only, keyed by
                                   their names in `model` (e.g. "layers.0.mlp.up_proj.lora_A")
Each file is written to a temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_write, atomic_write_text
from .config import AdapterConfig, CONFIG_FILE, METHODS
from .inject import adapter_config, adapter_layers, apply_adapters, modules_to_save
from .lora import is_conv1d

WEIGHTS_FILE = "adapter_model.safetensors"
# config fields that change what the adapted model computes; a loaded adapter must agree on them
FUNCTIONAL_FIELDS = ("method", "r", "num_experts", "alpha", "target_modules", "exclude_modules",
                     "modules_to_save", "competition", "competition_norm", "num_token_groups", "group_routing")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (never the frozen base weights) plus `modules_to_save` tensors, by name."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for key, param in layer.named_parameters():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = param
    for name, module in modules_to_save(model, adapter_config(model)).items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            state.setdefault(f"{name}.{key}", tensor)
    return state


def cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, ready for safetensors. An empty tensor is refused: it is
    what a sharded parameter looks like before it is gathered (ZeRO-3), and saving it would write
    a checkpoint that cannot be loaded."""
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"refusing to save empty tensors {empty[:5]}{' ...' if len(empty) > 5 else ''}: "
                         "sharded parameters must be gathered to full tensors first (pass state_dict=)")
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, format: str = "mm_teamlora",
                 base_model_name_or_path: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write the model's adapter to `directory`. `format="peft"` writes a plain LoRA adapter in the
    layout `peft.PeftModel.from_pretrained` loads (LoRA only, no `modules_to_save`).
    `state_dict` (keys as `adapter_state_dict(model)`) replaces the live tensors, e.g. full tensors
    gathered from shards by a training engine."""
    config = adapter_config(model)
    directory = os.fspath(directory)
    live = adapter_state_dict(model)
    if state_dict is not None and set(state_dict) != set(live):
        missing, extra = sorted(set(live) - set(state_dict)), sorted(set(state_dict) - set(live))
        raise ValueError(f"state_dict does not match the model's adapter tensors: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    tensors = cpu_tensors(live if state_dict is None else state_dict)
    os.makedirs(directory, exist_ok=True)
    if format == "peft":
        return _save_peft(model, config, directory, base_model_name_or_path, tensors)
    if format != "mm_teamlora":
        raise ValueError(f"format={format!r}; allowed: mm_teamlora, peft")
    atomic_write(os.path.join(directory, WEIGHTS_FILE),
                  lambda p: save_file(tensors, p, metadata={"format": "pt", "method": config.method}))
    atomic_write_text(os.path.join(directory, CONFIG_FILE), config.to_json() + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by `save_adapter` into `model`, a base model (the saved config is
    applied first) or one already adapted with an agreeing config. Strict: every tensor must be
    present with its exact name and shape."""
    directory = os.fspath(directory)
    saved_config = AdapterConfig.load(directory)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no adapter weights at {weights_path}")
    if not adapter_layers(model):
        apply_adapters(model, saved_config)
    else:
        current = adapter_config(model)
        differ = [f"{f}: model {getattr(current, f)!r} vs saved {getattr(saved_config, f)!r}"
                  for f in FUNCTIONAL_FIELDS if getattr(current, f) != getattr(saved_config, f)]
        if differ:
            raise ValueError(f"adapter at {directory} does not fit this model's adapters: " + "; ".join(differ))
    saved = load_file(weights_path)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong_shape = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sorted(set(saved) & set(expected)) if saved[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(items)}): {items[:8]}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)) if items]
        raise ValueError(f"adapter at {weights_path} does not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved[key].to(device=target.device, dtype=target.dtype))
    return model


def merge_adapters(model: nn.Module, expert_weights=None) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back.

    Exact for LoRA. A routed method's update depends on each token's routing, so no single weight
    reproduces it: merging refuses unless `expert_weights` fixes w (in the method's convention:
    TeamLoRA's sum to k, so all ones is uniform; MoELoRA's and HydraLoRA's sum to 1)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters to merge")
    method = adapter_config(model).method
    if method != "lora" and expert_weights is None:
        raise ValueError(
            f"cannot merge {method} exactly: its expert weights are computed per token by the router, "
            f"so the adapted layer is not a fixed linear map. Pass expert_weights=[...] (one per "
            f"expert) to merge with that fixed weighting, knowing outputs will differ, or keep the "
            f"adapters unmerged"
        )
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        delta = layer.delta_weight(expert_weights) if method != "lora" else layer.delta_weight()
        setattr(model.get_submodule(parent_name), child, layer.merge_into_base(delta))
    return model


def _save_peft(model: nn.Module, config: AdapterConfig, directory: str, base_name: str | None,
               state: dict[str, torch.Tensor]) -> str:
    if config.method != "lora":
        raise ValueError(f"peft has no {config.method}; only plain LoRA adapters can be written in peft's layout")
    if config.modules_to_save:
        raise ValueError("peft export of modules_to_save is not supported; save them with the mm_teamlora format")
    layers = adapter_layers(model)
    tensors = {}
    for name in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = state[f"{name}.lora_A"]
        tensors[f"base_model.model.{name}.lora_B.weight"] = state[f"{name}.lora_B"]
    fan_in_fan_out = any(is_conv1d(layer.base_layer) for layer in layers.values())
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": sorted(layers), "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "base_model_name_or_path": base_name, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "modules_to_save": None,
    }
    atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(peft_config, indent=2) + "\n")
    return directory


@dataclass
class ParameterReport:
    method: str
    total: int
    trainable: int
    adapter: int
    saved_modules: int
    scaling: float
    effective_gain: float  # gain of the update at uniform routing (see AdapterConfig.effective_gain)
    gain_vs_lora: float  # effective_gain / (alpha / r): vs a rank-r LoRA with the same alpha
    gains_by_method: dict  # the same ratio for every method at this r, alpha, num_experts

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "trainable_percent": self.trainable_percent}

    def __str__(self) -> str:
        gains = ", ".join(f"{m} {g:g}x" for m, g in self.gains_by_method.items())
        return (
            f"{self.method}: trainable {self.trainable:,} of {self.total:,} parameters "
            f"({self.trainable_percent:.3f}%; adapters {self.adapter:,}, saved modules {self.saved_modules:,})\n"
            f"scaling {self.scaling:g}; update gain at uniform routing {self.effective_gain:g} = "
            f"{self.gain_vs_lora:g}x a rank-r LoRA at the same alpha (all methods: {gains})"
        )


def trainable_parameter_report(model: nn.Module) -> ParameterReport:
    config = adapter_config(model)
    adapter = sum(p.numel() for layer in adapter_layers(model).values()
                  for k, p in layer.named_parameters() if not k.startswith("base_layer."))
    saved = sum(p.numel() for m in modules_to_save(model, config).values() for p in m.parameters())
    lora_gain = config.alpha / config.r
    gains = {}
    for method in METHODS:
        try:
            gains[method] = dataclasses.replace(config, method=method).effective_gain / lora_gain
        except ValueError:  # r not divisible by num_experts: that method cannot run at this r
            continue
    return ParameterReport(
        method=config.method,
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapter=adapter, saved_modules=saved, scaling=config.scaling,
        effective_gain=config.effective_gain, gain_vs_lora=config.effective_gain / lora_gain,
        gains_by_method=gains,
    )

