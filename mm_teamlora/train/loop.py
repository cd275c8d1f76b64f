"""One optimizer step through the DeepSpeed engine, validation, and the routing line.

The loss of an optimizer step is the cross-entropy summed over every supervised token of the step
(all its micro-batches, on every rank) divided by N, the number of those tokens:

    L = sum_tokens CE / N,    N = sum over micro-batches and ranks of supervised tokens.

DeepSpeed's `backward` divides each micro-batch's loss by the accumulation steps G, and its
gradient reduction averages over the R ranks, so each micro-batch hands it
`sum_CE(micro) * G * R / N`, which makes the reduced gradient exactly dL (a mean over micro-batch
means would weight a short micro-batch's tokens more). The balance loss (`collect_aux_loss`,
already weighted) is added per micro-batch as it is, so it enters as its mean over micro-batches
and ranks. N is known before the first backward: the step's micro-batches are fetched first and
their counts summed over ranks.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..adapters import RoutedAdapterLayer, adapter_layers, collect_aux_loss, record_routing
from ..adapters.routing import js_divergence
from ..constants import GROUP_IMAGE, GROUP_NAMES, IGNORE_INDEX, NUM_TOKEN_GROUPS

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts")


def supervised_tokens(batch: dict) -> int:
    """Tokens whose label is predicted: label t + 1 is supervised (as the loss shifts them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (batch[k].to(device) if isinstance(batch[k], torch.Tensor) else batch[k]) for k in MODEL_KEYS}


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in float64 on the communication device (a copy; `values` is unchanged)."""
    from deepspeed.accelerator import get_accelerator

    out = values.to(torch.float64 if get_accelerator().device_name() == "cpu" else torch.float32)
    out = out.to(get_accelerator().current_device_name())
    torch.distributed.all_reduce(out)
    return out.double().cpu()


@dataclass
class StepStats:
    """Sums over the step's micro-batches on every rank (after `reduce`)."""

    loss_sum: float = 0.0
    aux_sum: float = 0.0
    micro_batches: int = 0
    supervised: int = 0
    tokens: int = 0
    group_tokens: list = field(default_factory=lambda: [0] * NUM_TOKEN_GROUPS)
    source_loss: list = field(default_factory=list)
    source_tokens: list = field(default_factory=list)
    cache_hits: int = 0  # images whose tower features came from the feature cache
    cache_misses: int = 0  # images the tower ran on while the cache was on
    flags: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # rank 0's decisions: stop, save, fitted length

    def vector(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.aux_sum, self.micro_batches, self.supervised, self.tokens,
                             *self.group_tokens, *self.source_loss, *self.source_tokens, self.cache_hits,
                             self.cache_misses, *self.flags], dtype=torch.float64)

    @classmethod
    def from_vector(cls, v: torch.Tensor, sources: int) -> "StepStats":
        v = v.tolist()
        g, s = NUM_TOKEN_GROUPS, sources
        end = 5 + g + 2 * s
        return cls(v[0], v[1], int(v[2]), int(v[3]), int(v[4]), [int(x) for x in v[5:5 + g]],
                   v[5 + g:5 + g + s], v[5 + g + s:end], int(v[end]), int(v[end + 1]), v[end + 2:])

    def reduce(self, sources: int) -> "StepStats":
        return StepStats.from_vector(all_reduce_sum(self.vector()), sources)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.supervised, 1)

    @property
    def aux_loss(self) -> float:
        return self.aux_sum / max(self.micro_batches, 1)


def _forward(engine, batch: dict, feature_cache=None, all_logits: bool = False):
    """The engine's supervised-only forward of one micro-batch (`all_logits`: the LM head at every
    position); with a feature cache, the stored tower features go in (the tower runs on the other
    images) and the new ones are stored."""
    inputs = to_device(batch, engine.device)
    lookup = None
    if feature_cache is not None and batch["pixel_values"] is not None:
        lookup = feature_cache.lookup(batch["pixel_values"])
        inputs["tower_features"] = [None if f is None else f.to(engine.device) for f in lookup.features]
    out = engine(**inputs, supervised_only=True, all_logits=all_logits)
    if lookup is not None:
        feature_cache.store(lookup, out.tower_features)
    return out, lookup


def _count_lookup(stats: StepStats, lookup) -> None:
    if lookup is not None:
        missed = len(lookup.missing)
        stats.cache_hits += len(lookup.keys) - missed
        stats.cache_misses += missed


def _add_output(stats: StepStats, out, sources: list[str], source_index: dict[str, int]) -> None:
    stats.loss_sum += float(out.loss_sum.detach())
    stats.group_tokens = [a + int(b) for a, b in zip(stats.group_tokens, out.group_tokens.tolist())]
    stats.tokens += int(out.group_tokens.sum())
    for name, loss, count in zip(sources, out.row_loss.tolist(), out.row_tokens.tolist()):
        stats.source_loss[source_index[name]] += loss
        stats.source_tokens[source_index[name]] += count


def train_step(engine, micro_batches: list[dict], source_names: list[str], world_size: int,
               record: bool = False, feature_cache=None, all_logits: bool = False) -> tuple[StepStats, object | None]:
    """Forward and backward of every micro-batch, the optimizer step at the last one (DeepSpeed
    steps at its accumulation boundary). Returns this rank's sums and, when `record`, the routing
    recorded over the step. `feature_cache` (a `feature_cache.FeatureCache`) supplies and keeps
    the frozen tower's features; `all_logits` runs the LM head at every position (`supervised_logits: false`)."""
    model = engine.module
    index = {name: i for i, name in enumerate(source_names)}
    stats = StepStats(source_loss=[0.0] * len(source_names), source_tokens=[0] * len(source_names))
    local = sum(supervised_tokens(b) for b in micro_batches)
    n_global = max(float(all_reduce_sum(torch.tensor([local]))[0]), 1.0)
    factor = len(micro_batches) * world_size / n_global
    routed = record and any(isinstance(m, RoutedAdapterLayer) for m in adapter_layers(model).values())
    recording = record_routing(model) if routed else contextlib.nullcontext()
    with recording as routing:
        for batch in micro_batches:
            out, lookup = _forward(engine, batch, feature_cache, all_logits)
            _count_lookup(stats, lookup)
            aux = collect_aux_loss(model).to(out.loss_sum)
            engine.backward(out.loss_sum * factor + aux)
            engine.step()
            _add_output(stats, out, batch["sources"], index)
            stats.aux_sum += float(aux.detach())
            stats.micro_batches += 1
    stats.supervised = local
    return stats, routing


@torch.no_grad()
def validate(engine, batches, source_names: list[str], feature_cache=None, all_logits: bool = False) -> StepStats:
    """Summed loss over held-out batches on this rank (every rank runs the same number)."""
    engine.eval()
    index = {name: i for i, name in enumerate(source_names)}
    stats = StepStats(source_loss=[0.0] * len(source_names), source_tokens=[0] * len(source_names))
    try:
        for batch in batches:
            out, lookup = _forward(engine, batch, feature_cache, all_logits)
            _count_lookup(stats, lookup)
            _add_output(stats, out, batch["sources"], index)
            stats.supervised += supervised_tokens(batch)
            stats.micro_batches += 1
    finally:
        engine.train()
    return stats


def routing_usage(record) -> dict:
    """Expert usage by token group over every rank: per group, the router probabilities averaged
    over its real tokens and then over layers, and the JS divergence (bits) between image and
    text tokens, averaged over layers."""
    layers = list(record.layers.values())
    flat = torch.cat([torch.cat([s.tokens, s.router_prob_sum.flatten()]) for s in layers])
    flat = all_reduce_sum(flat)
    g, k = layers[0].router_prob_sum.shape
    per_layer = flat.view(len(layers), g + g * k)
    tokens, prob_sums = per_layer[:, :g], per_layer[:, g:].view(len(layers), g, k)
    usage, js = {}, []
    for group in range(g):
        if tokens[:, group].min() > 0:
            usage[GROUP_NAMES.get(group, str(group))] = (prob_sums[:, group] / tokens[:, group, None]).mean(0).tolist()
    text = [t for t in range(g) if t != GROUP_IMAGE]
    for layer in range(len(layers)):
        text_tokens = tokens[layer, text].sum()
        if tokens[layer, GROUP_IMAGE] > 0 and text_tokens > 0:
            js.append(js_divergence(prob_sums[layer, GROUP_IMAGE] / tokens[layer, GROUP_IMAGE],
                                    prob_sums[layer, text].sum(0) / text_tokens))
    return {"mean_router_prob": usage, "js_image_text": sum(js) / len(js) if js else None}


class Timer:
    """Wall time between marks, summed over a logging window."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
