"""Trainable-parameter counts of each method, and the rank that matches another method's count.

Per adapted linear layer (d_in -> d_out), k experts, total rank r, G token groups when
`group_routing` is on:

    lora       r (d_in + d_out)
    moelora    r (d_in + d_out) + k d_in                      (+ G k)
    hydralora  r d_in + k r d_out + k d_in                    (+ G k)
    teamlora   r (d_in + d_out) + k d_in + k^2 (with M)       (+ G k)

So at the same r, TeamLoRA and MoELoRA cost a LoRA plus their routers, and HydraLoRA about
(1 + k) / 2 times more: comparisons at matched parameters give LoRA and HydraLoRA the rank whose
count is closest to the routed method's (`matching_rank`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import AdapterConfig
from .inject import find_targets
from .lora import linear_shape


def layer_shapes(model: nn.Module, config: AdapterConfig) -> list[tuple[int, int]]:
    """(d_in, d_out) of every layer `config` would adapt in `model`."""
    return [linear_shape(model.get_submodule(name)) for name in find_targets(model, config)]


def parameter_count(shapes: list[tuple[int, int]], config: AdapterConfig) -> int:
    """Trainable adapter parameters `config` adds over layers of these shapes (see the module doc)."""
    r, k = config.r, config.num_experts
    total = 0
    for d_in, d_out in shapes:
        if config.method == "lora":
            total += r * (d_in + d_out)
            continue
        total += r * d_in + (k * r * d_out if config.method == "hydralora" else r * d_out) + k * d_in
        if config.method == "teamlora" and config.competition:
            total += k * k
        if config.group_routing:
            total += config.num_token_groups * k
    return total


def matching_rank(shapes: list[tuple[int, int]], reference: AdapterConfig, method: str) -> int:
    """The rank r for `method` (other fields as `reference`) whose parameter count is closest to
    `reference`'s; ties go to the smaller rank. Methods that split r over experts get a multiple
    of num_experts."""
    target = parameter_count(shapes, reference)
    step = reference.num_experts if method in ("teamlora", "moelora") else 1
    best = None
    for r in range(step, 8 * max(reference.r, 1) + step, step):
        count = parameter_count(shapes, dataclasses.replace(reference, method=method, r=r))
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), r)
        if count > target:
            break
    return best[1]
