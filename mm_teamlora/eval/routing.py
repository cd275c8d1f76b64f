"""Routing analysis: how a routed adapter's experts split visual and textual tokens.

Every real (non-padding) token of every sample is routed in every adapted layer; the model tags it
as an image patch (`image`), text of an image-grounded sample (`text_with_image`) or text of a
text-only sample (`text_only`). Per layer, per group and per category this records the token
count and the sums of the router probabilities `phi` (a softmax: a distribution over experts),
of the applied expert weights `w` (TeamLoRA's competition weights, which can be negative and sum
to k: reported, never used as distributions) and of the top-1 expert (argmax of `phi`).

Separation, per layer, from `phi` only (TEAMLORA.md 4c), with `P_g` the mean router distribution
of group g (sum of `phi` over its tokens / its token count):
- Jensen-Shannon divergence in bits, JS(P, Q) = (KL(P||M) + KL(Q||M)) / 2 with M = (P + Q) / 2,
  in [0, 1], for every pair of groups present, and for `image_grounded` (image and
  text_with_image tokens pooled, token-weighted) vs `text_only`. The headline is
  `image_vs_text_only` (image patches vs text of text-only samples: the plain visual/textual
  contrast, which, unlike the pooled one, does not move with the ratio of image to text tokens in
  image-grounded samples), else `image_vs_text_with_image` when the data hold no text-only
  sample (an MMBench file holds image-grounded samples only).
- Mutual information I(E; G) in bits between expert and group G (the groups present), over tokens:
  `mi_soft_bits` with the joint p(g, e) = (sum of phi_e over tokens of g) / N, i.e. the expert drawn
  from each token's router distribution; `mi_top1_bits` with the joint from top-1 counts.
  I(E; G) <= min(H(E), H(G)); `modality_entropy_bits` = H(G) gives the scale.
No token or expert count is assumed: both come from the data and from each layer.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..adapters import record_routing
from ..adapters.routing import js_divergence
from ..constants import GROUP_IMAGE, GROUP_NAMES, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE, IMAGE_PLACEHOLDER_ID
from ..data import (MixtureConfig, SourceConfig, SourceReport, load_image, prepare_source, read_records,
                    reported_id)
from ..data.templates import ConversationTemplate
from ..files import atomic_write_text
from ..padding import pad_ids, pad_token_id
from .mmbench import MMBenchData, PromptConfig, encode_question, read_mmbench

FORMAT = "mm_teamlora.routing/1"
KINDS = ("tokens", "prob", "weight", "top1")


@dataclass
class RoutingSample:
    input_ids: list[int]  # one IMAGE_PLACEHOLDER_ID per image
    category: str
    load_images: Callable[[], list]  # -> PIL images, in placeholder order

    @property
    def num_images(self) -> int:
        return sum(1 for t in self.input_ids if t == IMAGE_PLACEHOLDER_ID)


def group_name(g: int) -> str:
    return GROUP_NAMES.get(g, f"group{g}")


def samples_from_mmbench(data: MMBenchData, template: ConversationTemplate,
                         prompt: PromptConfig | None = None) -> list[RoutingSample]:
    """One sample per question (original option order): the evaluation prompt, without answer."""
    return [RoutingSample(encode_question(q, template, prompt), q.category or "(none)",
                          (lambda k=q.image_key: [] if k is None else [data.image(k)]))
            for q in data.asked(circular=False)]


def samples_from_conversations(path: str, template: ConversationTemplate, image_root: str | None = None,
                               on_error: str = "raise", max_length: int = 0, image_token_count: int = 1,
                               max_samples: int = 0) -> tuple[list[RoutingSample], SourceReport]:
    """LLaVA / messages / Alpaca JSON or JSONL records through the data pipeline as training reads
    them (`data.prepare_source`, no cache): checked, images checked, encoded whole (questions and
    answers) with `template`. Images are relative to `image_root` (default: the file's folder).
    `max_length` > 0 cuts samples at the tail as training does (images counted as
    `image_token_count` tokens; a sample left with no answer token is dropped and counted). Bad
    records follow `on_error`. Category: the record's `category` field, else `all`."""
    source = SourceConfig(path=path, image_root=image_root or os.path.dirname(os.path.abspath(path)),
                          max_samples=max_samples or None)
    config = MixtureConfig(sources=[source], name="routing", template=template.name,
                           max_length=max_length or sys.maxsize, image_token_count=image_token_count,
                           on_error=on_error, system_prompt=template.system_prompt).validate()
    prepared = prepare_source(source, config, template.tokenizer, template)
    categories = _categories(path, max_samples or None)
    samples = [RoutingSample(row["input_ids"], categories.get(row["id"], "all"), partial(_load_images, row["images"]))
               for row in prepared.data]
    return samples, prepared.report


def _categories(path: str, max_records: int | None) -> dict[str, str]:
    """Record id (as the data pipeline names records) -> the record's `category` field, where it has one."""
    out = {}
    for raw in read_records(path, max_records):
        category = raw.value.get("category") if isinstance(raw.value, dict) else None
        if isinstance(category, str):
            out.setdefault(reported_id(raw.value) or f"#{raw.index}", category)
    return out


def _load_images(paths: list[str]) -> list:
    return [load_image(p) for p in paths]


class RoutingTotals:
    """Per category and layer: token counts (G,) and sums of phi, w and top-1 hits (G, E), float64 on CPU."""

    def __init__(self):
        self.by_category: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
        self.samples: dict[str, int] = defaultdict(int)
        self.expected_tokens: dict[str, torch.Tensor] = {}  # counted from the inputs, for the check

    def add(self, category: str, record, expected: torch.Tensor, samples: int) -> None:
        layers = self.by_category[category]
        for name, stats in record.layers.items():
            parts = dict(zip(KINDS, (stats.tokens, stats.router_prob_sum, stats.weight_sum, stats.top1_count)))
            if name not in layers:
                layers[name] = {k: torch.zeros_like(v, device="cpu") for k, v in parts.items()}
            for k, v in parts.items():
                layers[name][k] += v.detach().cpu()
        previous = self.expected_tokens.get(category)
        self.expected_tokens[category] = expected if previous is None else previous + expected
        self.samples[category] += samples

    def overall(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for layers in self.by_category.values():
            for name, parts in layers.items():
                if name not in out:
                    out[name] = {k: v.clone() for k, v in parts.items()}
                else:
                    for k, v in parts.items():
                        out[name][k] += v
        return out


def _expected_tokens(samples: list[RoutingSample], image_tokens: int, groups: int) -> torch.Tensor:
    counts = torch.zeros(groups, dtype=torch.float64)
    for s in samples:
        n = s.num_images
        counts[GROUP_IMAGE] += n * image_tokens
        counts[GROUP_TEXT_WITH_IMAGE if n else GROUP_TEXT_ONLY] += len(s.input_ids) - n
    return counts


@torch.no_grad()
def record_samples(model, samples: list[RoutingSample], batch_size: int = 8, progress: bool = False) -> RoutingTotals:
    """Run every sample through the model (batched within each category) under `record_routing`."""
    totals = RoutingTotals()
    device = next(model.parameters()).device
    by_category: dict[str, list[RoutingSample]] = defaultdict(list)
    for s in samples:
        by_category[s.category].append(s)
    batches = [(c, group[i:i + batch_size]) for c, group in sorted(by_category.items())
               for i in range(0, len(group), batch_size)]
    if progress and batches:
        from tqdm import tqdm

        batches = tqdm(batches, desc="routing", unit="batch")
    was_training = model.training
    model.eval()
    try:
        for category, batch in batches:
            ids, mask = pad_ids([s.input_ids for s in batch], pad_token_id(model.tokenizer, default=0), device=device)
            images = [image for s in batch for image in s.load_images()]
            pixels = torch.stack([model.vision_tower.preprocess(i) for i in images]).to(device) if images else None
            counts = torch.tensor([s.num_images for s in batch], device=device)
            with record_routing(model.language_model) as record:
                model(ids, mask, pixel_values=pixels, image_counts=counts)
            groups = next(iter(record.layers.values())).tokens.shape[0]
            totals.add(category, record, _expected_tokens(batch, model.image_token_count, groups), len(batch))
    finally:
        model.train(was_training)
    return totals


def mutual_information_bits(joint: torch.Tensor) -> float:
    """I(E; G) in bits of a non-negative (groups, experts) table of joint masses or counts."""
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint.double() / total
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / outer[nz]).log2()).sum())


def _entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def separation(parts: dict[str, torch.Tensor]) -> dict:
    """JS divergences between mean router distributions, the headline name, MI soft / top-1 and
    H(G) for one layer's sums (see the module doc)."""
    tokens, prob = parts["tokens"], parts["prob"]
    present = [g for g in range(tokens.shape[0]) if tokens[g] > 0]
    mean = {group_name(g): prob[g] / tokens[g] for g in present}
    grounded = [g for g in (GROUP_IMAGE, GROUP_TEXT_WITH_IMAGE) if g in present]
    if grounded:
        mean["image_grounded"] = sum(prob[g] for g in grounded) / sum(tokens[g] for g in grounded)
    pairs = [("image", "text_only"), ("text_with_image", "text_only"), ("image", "text_with_image"),
             ("image_grounded", "text_only")]
    js = {f"{a}_vs_{b}": js_divergence(mean[a], mean[b]) for a, b in pairs if a in mean and b in mean}
    headline = next((k for k in ("image_vs_text_only", "image_vs_text_with_image") if k in js), None)
    rows = torch.tensor(present, dtype=torch.long)
    return {"js_bits": js, "headline": headline, "headline_js_bits": js.get(headline),
            "mi_soft_bits": mutual_information_bits(prob[rows]),
            "mi_top1_bits": mutual_information_bits(parts["top1"][rows]),
            "modality_entropy_bits": _entropy_bits(tokens[rows])}


def _layer_entry(parts: dict[str, torch.Tensor]) -> dict:
    tokens = parts["tokens"]
    groups = {}
    for g in range(tokens.shape[0]):
        n = float(tokens[g])
        if n > 0:
            groups[group_name(g)] = {"tokens": int(round(n)), "mean_router_prob": (parts["prob"][g] / n).tolist(),
                                     "mean_weight": (parts["weight"][g] / n).tolist(),
                                     "top1_share": (parts["top1"][g] / n).tolist()}
    return {"num_experts": int(parts["prob"].shape[1]), "groups": groups, "separation": separation(parts)}


def _section(layers: dict[str, dict[str, torch.Tensor]], expected: torch.Tensor, samples: int) -> dict:
    entries = {name: _layer_entry(parts) for name, parts in layers.items()}
    by_group = {group_name(g): int(round(float(expected[g]))) for g in range(expected.shape[0]) if expected[g] > 0}
    heads = [e["separation"]["headline_js_bits"] for e in entries.values()]
    heads = [h for h in heads if h is not None]
    first = next(iter(entries.values()), {"separation": {"headline": None}})
    summary = {"headline": first["separation"]["headline"],
               "mean_headline_js_bits": sum(heads) / len(heads) if heads else None,
               "mean_mi_soft_bits": _mean([e["separation"]["mi_soft_bits"] for e in entries.values()]),
               "mean_mi_top1_bits": _mean([e["separation"]["mi_top1_bits"] for e in entries.values()])}
    return {"samples": samples, "tokens": {"total": int(round(float(expected.sum()))), "by_group": by_group},
            "separation": summary, "layers": entries}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def analyse(totals: RoutingTotals) -> dict:
    """The routing.json content: overall and per-category sections (tokens, per-layer groups and separation)."""
    expected = sum(totals.expected_tokens.values())
    out = {"format": FORMAT, **_section(totals.overall(), expected, sum(totals.samples.values()))}
    out["by_category"] = {c: _section(layers, totals.expected_tokens[c], totals.samples[c])
                          for c, layers in sorted(totals.by_category.items())}
    return out


def routing_summary_line(result: dict) -> str:
    """Samples, tokens by group and the mean separation over layers, in one line."""
    sep = result["separation"]
    js = sep["mean_headline_js_bits"]
    return (f"{result['samples']} samples, {result['tokens']['total']} tokens {result['tokens']['by_group']}; "
            f"mean over {len(result['layers'])} layers: JS {sep['headline']} "
            f"{'-' if js is None else f'{js:.4f}'} bits, MI soft {sep['mean_mi_soft_bits']:.4f} bits")


def inspect_routing(model, data: str, out_dir: str, template: str = "chat", image_root: str | None = None,
                    batch_size: int = 8, on_error: str = "raise", max_samples: int = 0, max_length: int = 0,
                    plots: bool = True, model_name: str = "", progress: bool = False) -> dict:
    """Record routing on an MMBench TSV or a conversation JSON/JSONL file; write routing.json and
    (with `plots`) PNG heatmaps into `out_dir`. Returns the routing.json content."""
    import json

    chat = ConversationTemplate(template, model.tokenizer)
    if data.endswith(".tsv"):
        mmbench = read_mmbench(data, on_error=on_error)
        samples, report = samples_from_mmbench(mmbench, chat, PromptConfig(template=template)), mmbench.report
    else:
        samples, report = samples_from_conversations(data, chat, image_root, on_error, max_length,
                                                     model.image_token_count, max_samples)
    if max_samples > 0:
        samples = samples[:max_samples]
    if not samples:
        raise ValueError(f"{data}: no usable samples")
    result = {"data": data, "model": model_name, "skipped": dict(report.skipped),
              **analyse(record_samples(model, samples, batch_size, progress))}
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        from .plots import plot_routing

        result["plots"] = [os.path.basename(p) for p in plot_routing(result, out_dir)]
    atomic_write_text(os.path.join(out_dir, "routing.json"), json.dumps(result, indent=1) + "\n")
    return result

