"""Causal test of the visual / textual split: mask the experts image tokens prefer, measure the loss.

Routing that separates image and text tokens (`separation.py`) is visible; this tests whether it
matters. Per routed layer, from the routing report's mean router probabilities `P_g` (a
distribution over the layer's experts, mean of `phi` over the real tokens of group g):
    preference_e = P_image[e] - P_text[e]
with `text` the text tokens of text-only samples where the data hold any (the headline contrast,
`image_vs_text_only`), else the text of image-grounded samples (`image_vs_text_with_image`).
Three masks of `count` experts per layer (`count` < k: at least one expert stays):
- `image_preferred`: the `count` experts of largest preference (ties: lower index first);
- `text_preferred`: the `count` of smallest preference (largest P_text - P_image);
- `random`: `count` experts drawn uniformly per layer (a `torch.Generator` seeded with `seed`,
  layers in report order), the control: what removing that many experts costs at all.
A masked expert is removed from its layer as the adapters define it (renormalised over the kept
experts; `adapters/routed.py`), every layer masked at once.

Measurement: the mean answer-token loss (cross-entropy over the supervised tokens, token-weighted:
summed over every answer token of the kind, divided by their count) on image questions (samples
with at least one image) and on text-only questions (samples without one), unmasked (`baseline`)
and under each mask; `delta` = masked - baseline, `image_minus_text` = delta image - delta text-only.
A split that is causal shows image_preferred raising the image loss more than the text-only loss
and more than random does, and text_preferred the reverse. For an MMBench TSV the answer is the
right option's letter, one token: the loss is -log p(letter) over the whole vocabulary at the
first answer position, as likelihood scoring reads it (`compare.answer_loss`); for conversation
files, every assistant token the template supervises, as in training.
"""

from __future__ import annotations

import contextlib

import torch

from ..adapters.masking import masked_experts, routed_layers
from ..constants import IGNORE_INDEX, OPTION_LETTERS
from ..padding import pad_ids
from .answers import letter_token_ids
from .mmbench import encode_question
from .samples import RoutingSample, batch_inputs

FORMAT = "mm_teamlora.ablation/1"
MASKS = ("image_preferred", "text_preferred", "random")
KINDS = ("image", "text_only")  # question kinds: with at least one image, without any


def answer_samples(data, template, prompt=None, max_samples: int = 0) -> list[RoutingSample]:
    """The labelled questions of an MMBench file (`MMBenchData`), in the order and number
    `routing.samples_from_mmbench` gives (`max_samples` > 0: the first ones): the prompt followed
    by the right letter's first answer token, the only supervised token. Unlabelled ones are left out."""
    letters = letter_token_ids(template, OPTION_LETTERS)
    asked = data.asked(circular=False)
    out = []
    for q in asked[:max_samples] if max_samples > 0 else asked:
        if q.answer is None:
            continue
        prompt_ids = encode_question(q, template, prompt)
        out.append(RoutingSample(prompt_ids + [letters[q.answer]], q.category or "(none)",
                                 (lambda k=q.image_key: [] if k is None else [data.image(k)]),
                                 [IGNORE_INDEX] * len(prompt_ids) + [letters[q.answer]]))
    return out


def _contrast(layers: dict) -> str:
    groups = [set(layer["groups"]) for layer in layers.values()]
    if not groups or not all("image" in g for g in groups):
        raise ValueError("the expert-masking test needs image tokens in the routing data (an image question)")
    for text in ("text_only", "text_with_image"):
        if all(text in g for g in groups):
            return text
    raise ValueError("the expert-masking test needs text tokens in the routing data")


def choose_experts(layers: dict, count: int = 1, seed: int = 0) -> dict:
    """The three masks (see the module doc) from a routing report's `layers` section (per layer:
    `num_experts` and `groups` -> `mean_router_prob`): {"contrast", "preference": {layer: [..]},
    "masks": {mask: {layer: [expert, ...]}}}."""
    text = _contrast(layers)
    generator = torch.Generator().manual_seed(seed)
    preference, masks = {}, {m: {} for m in MASKS}
    for name, layer in layers.items():
        k = layer["num_experts"]
        if not 1 <= count < k:
            raise ValueError(f"{name}: can mask 1 to {k - 1} of its {k} experts, not {count}")
        image, other = layer["groups"]["image"]["mean_router_prob"], layer["groups"][text]["mean_router_prob"]
        d = [a - b for a, b in zip(image, other)]
        preference[name] = d
        masks["image_preferred"][name] = sorted(sorted(range(k), key=lambda e: (-d[e], e))[:count])
        masks["text_preferred"][name] = sorted(sorted(range(k), key=lambda e: (d[e], e))[:count])
        masks["random"][name] = sorted(torch.randperm(k, generator=generator)[:count].tolist())
    return {"contrast": f"image_vs_{text}", "preference": preference, "masks": masks}


@torch.no_grad()
def answer_losses(model, samples: list[RoutingSample], conditions: dict, batch_size: int = 8,
                  progress: bool = False) -> dict:
    """Per condition (name -> {layer: experts} masks over `model.language_model`, or None for
    none) and question kind: {"loss" (token-weighted mean), "tokens", "questions"}. Each batch's
    pictures go through the tower once and serve every condition."""
    samples = [s for s in samples if s.labels is not None and any(t != IGNORE_INDEX for t in s.labels)]
    device = next(model.parameters()).device
    sums = {c: {kind: [0.0, 0, 0] for kind in KINDS} for c in conditions}
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    if progress and batches:
        from tqdm import tqdm

        batches = tqdm(batches, desc="masking", unit="batch")
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, mask, pixels, counts = batch_inputs(model, batch, device)
            labels, _ = pad_ids([s.labels for s in batch], IGNORE_INDEX, device=device)
            features = model.encode_images(pixels) if pixels is not None else None
            kinds = ["image" if s.num_images else "text_only" for s in batch]
            for name, masks in conditions.items():
                block = masked_experts(model.language_model, masks) if masks else contextlib.nullcontext()
                with block:
                    out = model(ids, mask, labels=labels, image_counts=counts, image_features=features,
                                supervised_only=True)
                for kind, loss, n in zip(kinds, out.row_loss.tolist(), out.row_tokens.tolist()):
                    acc = sums[name][kind]
                    acc[0], acc[1], acc[2] = acc[0] + loss, acc[1] + int(n), acc[2] + 1
    finally:
        model.train(was_training)
    return {c: {kind: {"loss": total / n if n else None, "tokens": n, "questions": q}
                for kind, (total, n, q) in by_kind.items()} for c, by_kind in sums.items()}


def ablate(model, samples: list[RoutingSample], layers: dict, count: int = 1, seed: int = 0, batch_size: int = 8,
           progress: bool = False) -> dict:
    """The masking test (module doc) of `model` (a `MultimodalLM` with routed adapters) on labelled
    `samples`, with the masks chosen from `layers` (the routing report's per-layer section)."""
    routed_layers(model.language_model)  # a clear error for plain LoRA, before any work
    choice = choose_experts(layers, count, seed)
    losses = answer_losses(model, samples, {"baseline": None, **choice["masks"]}, batch_size, progress)
    base = {kind: losses["baseline"][kind]["loss"] for kind in KINDS}
    masks = {}
    for name in MASKS:
        loss = {kind: losses[name][kind]["loss"] for kind in KINDS}
        delta = {kind: None if base[kind] is None else loss[kind] - base[kind] for kind in KINDS}
        masks[name] = {"loss": loss, "delta": delta,
                       "image_minus_text": (None if None in delta.values() else delta["image"] - delta["text_only"]),
                       "experts": choice["masks"][name]}
    return {"format": FORMAT, "contrast": choice["contrast"], "experts_per_layer": count, "seed": seed,
            "layers": len(layers),
            "questions": {kind: losses["baseline"][kind]["questions"] for kind in KINDS},
            "answer_tokens": {kind: losses["baseline"][kind]["tokens"] for kind in KINDS},
            "baseline": base, "masks": masks, "preference": choice["preference"]}


def _cell(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")


def ablation_markdown(result: dict) -> str:
    """The masking test as a markdown table (routing.md; the CLI prints it)."""
    q = result["questions"]
    lines = [f"## Expert masking ({result['experts_per_layer']} expert(s) masked in each of {result['layers']} "
             f"layers; preference: {result['contrast']}; random seed {result['seed']})", "",
             f"Answer-token loss on {q['image']} image questions and {q['text_only']} text-only questions.", "",
             "| mask | image loss | Δ image | text-only loss | Δ text-only | Δ image - Δ text-only |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| none | {_cell(result['baseline']['image'])} | | {_cell(result['baseline']['text_only'])} | | |"]
    for name, m in result["masks"].items():
        lines.append(f"| {name} | {_cell(m['loss']['image'])} | {_cell(m['delta']['image'], True)} | "
                     f"{_cell(m['loss']['text_only'])} | {_cell(m['delta']['text_only'], True)} | "
                     f"{_cell(m['image_minus_text'], True)} |")
    lines += ["", _reading(result["masks"])]
    return "\n".join(lines)


def _reading(masks: dict) -> str:
    """What the table shows, stated as far as one random draw allows (it gives the control no spread)."""
    gap = {name: masks[name]["image_minus_text"] for name in ("image_preferred", "text_preferred", "random")}
    if None in gap.values():
        return "No reading: a group of questions is missing."
    split = gap["image_preferred"] > gap["random"] > gap["text_preferred"]
    head = ("Consistent with a causal split" if split else "No causal split shown") + (
        f": Δ image - Δ text-only is {gap['image_preferred']:+.4f} masking the image-preferred experts, "
        f"{gap['text_preferred']:+.4f} masking the text-preferred ones and {gap['random']:+.4f} masking random ones")
    return (head + ". One random draw gives the control no spread, so differences of a few hundredths are not "
            "evidence on their own; `mm-teamlora compare` repeats the test over seeds.")
