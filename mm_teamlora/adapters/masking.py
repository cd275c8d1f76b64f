"""Expert masks over a model's routed adapter layers (the maths is in routed.py's module doc).

    with masked_experts(model, {"model.layers.0.mlp.up_proj": [2], ...}):
        out = model(...)   # layer 0's up_proj runs without expert 2, renormalised over the rest
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

from torch import nn

from .lora import AdapterLayer
from .routed import RoutedAdapterLayer


def routed_layers(model: nn.Module) -> dict[str, RoutedAdapterLayer]:
    """The routed adapter layers of `model` by name; a ValueError saying so when it has none (plain
    LoRA has no experts to mask)."""
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    routed = {n: m for n, m in adapted.items() if isinstance(m, RoutedAdapterLayer)}
    if not routed:
        methods = sorted({m.config.method for m in adapted.values()})
        has = f"has {', '.join(methods)} adapters, which have no experts" if methods else "has no adapters"
        raise ValueError(f"expert masking needs a routed adapter method (moelora, hydralora, teamlora); this model {has}")
    return routed


@contextlib.contextmanager
def masked_experts(model: nn.Module, masks: Mapping[str, object]) -> Iterator[dict[str, RoutedAdapterLayer]]:
    """Inside the block, each routed layer `name` of `model` (names as `model.named_modules()`
    gives them) runs without the experts `masks[name]` (indices or a bool mask, as
    `RoutedAdapterLayer.set_expert_mask` takes); other layers are untouched. A layer's previous
    mask is back on exit (an inner block replaces, not joins, an outer one's mask of that layer).
    Raises ValueError for a model without routed adapter layers (plain LoRA has no experts) or a
    name that is not one. Yields the masked layers by name."""
    routed = routed_layers(model)
    unknown = [n for n in masks if n not in routed]
    if unknown:
        raise ValueError(f"not routed adapter layers of this model: {unknown[:5]}"
                         + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    previous = {n: routed[n].expert_mask for n in masks}
    try:
        for name, experts in masks.items():
            routed[name].set_expert_mask(experts)
        yield {n: routed[n] for n in masks}
    finally:
        for name, mask in previous.items():
            routed[name].expert_mask = mask
