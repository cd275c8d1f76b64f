"""Routing analysis: how a routed adapter's experts split visual and textual tokens.

Every real (non-padding) token of every sample is routed in every adapted layer; the model tags it
as an image patch (`image`), text of an image-grounded sample (`text_with_image`) or text of a
text-only sample (`text_only`). Per layer, per group and per category this records the token
count and the sums of the router probabilities `phi` (a softmax: a distribution over experts),
of the applied expert weights `w` (TeamLoRA's competition weights, which can be negative and sum
to k: reported, never used as distributions) and of the top-1 expert (argmax of `phi`).

`analyse` turns those sums into `routing.json`: an overall section and one per category, each
with per-layer group means and separation (JS divergence, mutual information, from `phi` only;
see `separation.py`); `plots.py` draws the heatmaps. No token or expert count is assumed: both
come from the data and from each layer.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from functools import partial

import torch

from ..adapters import record_routing
from ..constants import GROUP_IMAGE, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE
from ..data import (MixtureConfig, SourceConfig, SourceReport, load_image, prepare_source, read_records,
                    reported_id)
from ..data.errors import REJECTED_FILE, write_rejected
from ..data.templates import ConversationTemplate
from ..files import atomic_write_text
from .mmbench import MMBenchData, PromptConfig, encode_question, read_mmbench
from .samples import RoutingSample, batch_inputs
from .separation import section

FORMAT = "mm_teamlora.routing/1"
KINDS = ("tokens", "prob", "weight", "top1")


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
    samples = [RoutingSample(row["input_ids"], categories.get(row["id"], "all"), partial(_load_images, row["images"]),
                             list(row["labels"]))
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
            ids, mask, pixels, counts = batch_inputs(model, batch, device)
            with record_routing(model.language_model) as record:
                model(ids, mask, pixel_values=pixels, image_counts=counts)
            groups = next(iter(record.layers.values())).tokens.shape[0]
            totals.add(category, record, _expected_tokens(batch, model.image_token_count, groups), len(batch))
    finally:
        model.train(was_training)
    return totals


def analyse(totals: RoutingTotals) -> dict:
    """The routing.json content: overall and per-category sections (tokens, per-layer groups and separation)."""
    expected = sum(totals.expected_tokens.values())
    out = {"format": FORMAT, **section(totals.overall(), expected, sum(totals.samples.values()))}
    out["by_category"] = {c: section(layers, totals.expected_tokens[c], totals.samples[c])
                          for c, layers in sorted(totals.by_category.items())}
    return out


def routing_summary_line(result: dict) -> str:
    """Samples, tokens by group and the mean separation over layers, in one line."""
    sep = result["separation"]
    js = sep["mean_headline_js_bits"]
    return (f"{result['samples']} samples, {result['tokens']['total']} tokens {result['tokens']['by_group']}; "
            f"mean over {len(result['layers'])} layers: JS {sep['headline']} "
            f"{'-' if js is None else f'{js:.4f}'} bits, MI soft {sep['mean_mi_soft_bits']:.4f} bits")


def load_samples(model, data: str, template: str = "chat", image_root: str | None = None, on_error: str = "raise",
                 max_samples: int = 0, max_length: int = 0, with_answers: bool = False):
    """(samples, the file's report, answer samples) of an MMBench TSV or a conversation JSON/JSONL
    file, as `inspect_routing` reads them. Answer samples (with `with_answers`, else None) are the
    same questions with labels, for answer-token losses (`ablation.answer_samples`)."""
    chat = ConversationTemplate(template, model.tokenizer)
    if data.endswith(".tsv"):
        mmbench = read_mmbench(data, on_error=on_error)
        prompt = PromptConfig(template=template)
        samples, report = samples_from_mmbench(mmbench, chat, prompt), mmbench.report
    else:
        samples, report = samples_from_conversations(data, chat, image_root, on_error, max_length,
                                                     model.image_token_count, max_samples)
    if max_samples > 0:
        samples = samples[:max_samples]
    answers = None
    if with_answers:
        from .ablation import answer_samples

        answers = (answer_samples(mmbench, chat, prompt, max_samples) if data.endswith(".tsv")
                   else [s for s in samples if s.labels is not None])
    return samples, report, answers


def inspect_routing(model, data: str, out_dir: str, template: str = "chat", image_root: str | None = None,
                    batch_size: int = 8, on_error: str = "raise", max_samples: int = 0, max_length: int = 0,
                    plots: bool = True, model_name: str = "", progress: bool = False, ablate: bool = False,
                    ablate_experts: int = 1, ablate_seed: int = 0, ablate_draws: int = 3) -> dict:
    """Record routing on an MMBench TSV or a conversation JSON/JSONL file; write routing.json,
    routing.md, rejected.jsonl (every skipped row or record) and (with `plots`) PNG heatmaps into
    `out_dir`. With `ablate`, also the causal masking test (`ablation.ablate`: `ablate_experts`
    image-/text-preferred experts masked per layer, and `ablate_draws` random draws from seeds
    `ablate_seed`, `ablate_seed + 1`, ...; answer-token losses) under "ablation". Returns the
    routing.json content."""
    import json

    samples, report, answers = load_samples(model, data, template, image_root, on_error, max_samples, max_length,
                                            with_answers=ablate)
    if not samples:
        raise ValueError(f"{data}: no usable samples")
    result = {"data": data, "model": model_name, "skipped": dict(report.skipped),
              **analyse(record_samples(model, samples, batch_size, progress))}
    if ablate:
        from .ablation import ablate as run_ablation

        result["ablation"] = run_ablation(model, answers, result["layers"], ablate_experts, ablate_seed, batch_size,
                                          progress, random_draws=ablate_draws)
    os.makedirs(out_dir, exist_ok=True)
    write_rejected([report], os.path.join(out_dir, REJECTED_FILE))
    if plots:
        from .plots import plot_routing

        result["plots"] = [os.path.basename(p) for p in plot_routing(result, out_dir)]
    atomic_write_text(os.path.join(out_dir, "routing.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(out_dir, "routing.md"), routing_markdown(result))
    return result


def routing_markdown(result: dict) -> str:
    """routing.md: the summary line, the separation per layer and (when run) the masking test's table."""
    lines = [f"# Routing of {result.get('model') or 'the model'} on {result.get('data', '')}", "",
             routing_summary_line(result), "", "| layer | headline | JS bits | MI soft bits |",
             "| --- | --- | ---: | ---: |"]
    for name, layer in result["layers"].items():
        sep = layer["separation"]
        js = sep["headline_js_bits"]
        lines.append(f"| {name} | {sep['headline']} | {'-' if js is None else f'{js:.4f}'} | "
                     f"{sep['mi_soft_bits']:.4f} |")
    if result.get("ablation"):
        from .ablation import ablation_markdown

        lines += ["", ablation_markdown(result["ablation"])]
    return "\n".join(lines) + "\n"
