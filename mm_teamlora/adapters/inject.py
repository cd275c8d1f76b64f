"""Putting adapters into any nn.Module by target names, and model-level helpers.

`apply_adapters(model, config)` replaces each matched linear layer with the method's adapter layer
(in place), then freezes every parameter except the adapters' and those of `modules_to_save`.

Matching rules (module names as `model.named_modules()` gives them):
- a list: each entry matches a name equal to it or ending in "." + entry (a dotted suffix);
- a preset: `attention` / `mlp` = linear layers inside a submodule whose attribute name is one of
  ATTENTION_BLOCKS / MLP_BLOCKS (whole path components, never substrings); `all-linear` = every
  linear layer except the model's output head (`get_output_embeddings()`, or a module `lm_head`);
- any other string: a regex that must match the whole module name.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

import torch
from torch import nn

from .config import AdapterConfig
from .lora import AdapterLayer, LoRALinear, is_adaptable
from .routed import HydraLoRALinear, MoELoRALinear, RoutedAdapterLayer
from .routing import LayerRoutingStats, RoutingRecord
from .teamlora import TeamLoRALinear

logger = logging.getLogger(__name__)

LAYER_CLASSES = {
    "lora": LoRALinear,
    "moelora": MoELoRALinear,
    "hydralora": HydraLoRALinear,
    "teamlora": TeamLoRALinear,
}
# attribute names under which HF models keep their attention and feed-forward blocks
ATTENTION_BLOCKS = ("self_attn", "attn", "attention", "self_attention", "cross_attn")
MLP_BLOCKS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def matches_name(name: str, patterns: list[str]) -> bool:
    """True when `name` equals a pattern or ends with "." + pattern."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the linear layers `config` selects; raises when none does."""
    linear = [n for n, m in model.named_modules() if is_adaptable(m) and not isinstance(m, AdapterLayer)]
    inside_adapter = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    linear = [n for n in linear if not any(n.startswith(a + ".") for a in inside_adapter)]
    targets = config.target_modules
    if isinstance(targets, list):
        chosen = [n for n in linear if matches_name(n, targets)]
        for name, module in model.named_modules():
            # a named leaf that is not linear (an Embedding, a norm) is a mistake worth naming
            is_leaf = next(module.children(), None) is None
            if is_leaf and not is_adaptable(module) and matches_name(name, targets):
                pattern = next(p for p in targets if matches_name(name, [p]))
                raise TypeError(
                    f"target {pattern!r} matches {name!r}, a {type(module).__name__}; only "
                    f"nn.Linear and Conv1D layers can be adapted"
                )
        missing = [p for p in targets if not any(matches_name(n, [p]) for n in linear)]
        if missing and len(missing) < len(targets):
            logger.warning("target_modules entries that match no linear layer: %s", missing)
    elif targets == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n in linear if n not in heads]
    elif targets in ("attention", "mlp"):
        blocks = ATTENTION_BLOCKS if targets == "attention" else MLP_BLOCKS
        chosen = [n for n in linear if any(part in blocks for part in n.split(".")[:-1])]
    else:
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"target_modules {targets!r} is neither a preset nor a valid regex: {e}") from e
        chosen = [n for n in linear if pattern.fullmatch(n)]
    chosen = [n for n in chosen if not matches_name(n, config.exclude_modules)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in linear})
        raise ValueError(
            f"target_modules={targets!r} (exclude_modules={config.exclude_modules}) matches no "
            f"linear layer of {type(model).__name__}. Its linear layers are named: {suffixes}"
            + (f" (e.g. {linear[0]!r})" if linear else " (it has none)")
        )
    return chosen


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Adapt `model` in place as `config` says and return it. Freezes everything else except the
    parameters of `modules_to_save`."""
    if adapter_layers(model):
        raise ValueError(f"{type(model).__name__} already has adapters; load or merge instead of applying twice")
    targets = find_targets(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    layer_class = LAYER_CLASSES[config.method]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, layer_class(base, config, generator).train(base.training))
    saved = modules_to_save(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer."):
                param.requires_grad_(True)
    for module in saved.values():
        module.requires_grad_(True)
    return model


def modules_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The modules `config.modules_to_save` names; raises on a name that matches nothing."""
    found = {n: m for n, m in model.named_modules() if n and matches_name(n, config.modules_to_save)}
    missing = [p for p in config.modules_to_save if not any(matches_name(n, [p]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    return found


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_config(model: nn.Module) -> AdapterConfig:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters; call apply_adapters or load_adapter first")
    return next(iter(layers.values())).config


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """balance_weight * mean over routed layers of their balance loss from the last forward.
    Zero when the method has no router, the weight is 0, or the last forward ran without grad.

    Collecting hands the losses over: the layers drop their references, because each loss holds the
    forward's autograd graph (and its saved activations) alive for as long as it is referenced."""
    layers = [m for m in adapter_layers(model).values() if isinstance(m, RoutedAdapterLayer)]
    losses = [m.balance_loss for m in layers if m.balance_loss is not None]
    for layer in layers:
        layer.balance_loss = None
    if not losses:
        return torch.zeros(())
    return adapter_config(model).balance_weight * torch.stack(losses).mean()


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Accumulate, per routed layer and token group, router probabilities and expert weights of
    real tokens for the forwards inside the block. Off by default; costs a few small ops a layer."""
    record = RoutingRecord()
    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, RoutedAdapterLayer)}
    if not layers:
        raise ValueError("record_routing needs a routed adapter method (moelora, hydralora, teamlora)")
    for name, layer in layers.items():
        if layer.recorder is not None:
            raise RuntimeError(f"record_routing is already active on {name}")
        layer.recorder = record.layers[name] = LayerRoutingStats(
            layer.config.num_token_groups, layer.num_experts, layer.router.device
        )
    try:
        yield record
    finally:
        for layer in layers.values():
            layer.recorder = None
