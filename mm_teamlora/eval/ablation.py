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
- `random`: `count` experts drawn uniformly per layer (a `torch.Generator` seeded with the draw's
  seed, layers in report order), the control: what removing that many experts costs at all. It is
  drawn `random_draws` times, with seeds `seed`, `seed + 1`, ...; its figures are the draws' mean,
  with their sample standard deviation (None for one draw) as the control's spread.
A masked expert is removed from its layer as the adapters define it (renormalised over the kept
experts; `adapters/routed.py`), every layer masked at once.

Measurement: the mean answer-token loss (cross-entropy over the supervised tokens, token-weighted:
summed over every answer token of the kind, divided by their count) on image questions (samples
with at least one image) and on text-only questions (samples without one), unmasked (`baseline`)
and under each mask; `delta` = masked - baseline, `image_minus_text` = delta image - delta text-only.
A split that is causal shows image_preferred raising the image loss more than the text-only loss
and more than random does, and text_preferred the reverse. The reading (`ablation_markdown`) counts
a preferred mask as beyond the control when its image_minus_text lies outside the random draws'
mean +- 2 sample std, on the side a split predicts; with one draw (or draws that do not differ)
there is no spread, and only the order is stated. For an MMBench TSV the answer is the
right option's letter, one token: the loss is -log p(letter) over the whole vocabulary at the
first answer position, as likelihood scoring reads it (`compare.answer_loss`); for conversation
files, every assistant token the template supervises, as in training.
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from ..adapters.masking import masked_experts, routed_layers
from ..constants import IGNORE_INDEX, OPTION_LETTERS
from ..padding import pad_ids
from .answers import letter_token_ids
from .mmbench import encode_question
from .samples import RoutingSample, batch_inputs

FORMAT = "mm_teamlora.ablation/2"  # 2: the random control is the mean of several draws
MASKS = ("image_preferred", "text_preferred", "random")
KINDS = ("image", "text_only")  # question kinds: with at least one image, without any
GAPS = (*KINDS, "image_minus_text")  # the figures of a mask: delta per kind and their difference
SPREAD_STDS = 2  # the reading's rule: beyond the random draws' mean +- SPREAD_STDS sample std


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


def choose_experts(layers: dict, count: int = 1, seed: int = 0, draws: int = 1) -> dict:
    """The three masks (see the module doc) from a routing report's `layers` section (per layer:
    `num_experts` and `groups` -> `mean_router_prob`): {"contrast", "preference": {layer: [..]},
    "masks": {mask: {layer: [expert, ...]}}, "draws": [{"seed", "experts"}, ...]}, the random mask
    drawn `draws` times: draw i has seed `seed + i` and its own generator (it is
    `choose_experts(layers, count, seed + i)`'s random mask); masks["random"] is the first draw."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"random draws: need at least 1, not {draws!r}")
    text = _contrast(layers)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(draws)]
    preference, masks = {}, {m: {} for m in MASKS}
    drawn = [{"seed": seed + i, "experts": {}} for i in range(draws)]
    for name, layer in layers.items():
        k = layer["num_experts"]
        if not 1 <= count < k:
            raise ValueError(f"{name}: can mask 1 to {k - 1} of its {k} experts, not {count}")
        image, other = layer["groups"]["image"]["mean_router_prob"], layer["groups"][text]["mean_router_prob"]
        d = [a - b for a, b in zip(image, other)]
        preference[name] = d
        masks["image_preferred"][name] = sorted(sorted(range(k), key=lambda e: (-d[e], e))[:count])
        masks["text_preferred"][name] = sorted(sorted(range(k), key=lambda e: (d[e], e))[:count])
        for draw, generator in zip(drawn, generators):
            draw["experts"][name] = sorted(torch.randperm(k, generator=generator)[:count].tolist())
    masks["random"] = drawn[0]["experts"]
    return {"contrast": f"image_vs_{text}", "preference": preference, "masks": masks, "draws": drawn}


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


def _figures(loss: dict, base: dict) -> dict:
    """A condition's losses per kind -> {"loss", "delta", "image_minus_text"}."""
    delta = {kind: None if base[kind] is None or loss[kind] is None else loss[kind] - base[kind] for kind in KINDS}
    return {"loss": loss, "delta": delta,
            "image_minus_text": None if None in delta.values() else delta["image"] - delta["text_only"]}


def _spread(values: list) -> dict:
    """{"mean", "std" (sample std; None under 2 values), "n"} of the measured values."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def ablate(model, samples: list[RoutingSample], layers: dict, count: int = 1, seed: int = 0, batch_size: int = 8,
           progress: bool = False, random_draws: int = 3) -> dict:
    """The masking test (module doc) of `model` (a `MultimodalLM` with routed adapters) on labelled
    `samples`, with the masks chosen from `layers` (the routing report's per-layer section) and the
    random control drawn `random_draws` times (seeds `seed`, `seed + 1`, ...).

    masks[mask] = {"loss", "delta" (per kind), "image_minus_text", "experts" ({layer: [..]})}; for
    "random" these are the draws' means (experts: the first draw's), with "std" (per figure of
    GAPS: the draws' sample std, None for one draw) and "draws" (each one's seed, experts and
    figures)."""
    routed_layers(model.language_model)  # a clear error for plain LoRA, before any work
    choice = choose_experts(layers, count, seed, random_draws)
    conditions = {"baseline": None, "image_preferred": choice["masks"]["image_preferred"],
                  "text_preferred": choice["masks"]["text_preferred"],
                  **{f"random@{d['seed']}": d["experts"] for d in choice["draws"]}}
    losses = answer_losses(model, samples, conditions, batch_size, progress)
    loss_of = lambda condition: {kind: losses[condition][kind]["loss"] for kind in KINDS}  # noqa: E731
    base = loss_of("baseline")
    masks = {name: {**_figures(loss_of(name), base), "experts": choice["masks"][name]}
             for name in ("image_preferred", "text_preferred")}
    draws = [{"seed": d["seed"], **_figures(loss_of(f"random@{d['seed']}"), base), "experts": d["experts"]}
             for d in choice["draws"]]
    spread = {key: _spread([d[key] if key == "image_minus_text" else d["delta"][key] for d in draws]) for key in GAPS}
    mean_loss = {kind: _spread([d["loss"][kind] for d in draws])["mean"] for kind in KINDS}
    masks["random"] = {"loss": mean_loss, "delta": {kind: spread[kind]["mean"] for kind in KINDS},
                       "image_minus_text": spread["image_minus_text"]["mean"], "experts": draws[0]["experts"],
                       "std": {key: spread[key]["std"] for key in GAPS}, "draws": draws}
    return {"format": FORMAT, "contrast": choice["contrast"], "experts_per_layer": count, "seed": seed,
            "random_draws": random_draws, "layers": len(layers),
            "questions": {kind: losses["baseline"][kind]["questions"] for kind in KINDS},
            "answer_tokens": {kind: losses["baseline"][kind]["tokens"] for kind in KINDS},
            "baseline": base, "masks": masks, "preference": choice["preference"]}


def _cell(value: float | None, signed: bool = False, std: float | None = None) -> str:
    if value is None:
        return "-"
    return (f"{value:+.4f}" if signed else f"{value:.4f}") + ("" if std is None else f" ± {std:.4f}")


def _draws(result: dict) -> list[dict]:
    """The random control's draws (a result made before there were several: its one draw)."""
    random = result["masks"]["random"]
    return random.get("draws") or [{"seed": result.get("seed"), **random}]


def _seeds(draws: list[dict]) -> str:
    seeds = [d["seed"] for d in draws]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def ablation_markdown(result: dict) -> str:
    """The masking test as a markdown table (routing.md; the CLI prints it): the random control as
    the mean ± sample std of its draws, then each draw, then the reading (`_reading`)."""
    q, draws = result["questions"], _draws(result)
    lines = [f"## Expert masking ({result['experts_per_layer']} expert(s) masked in each of {result['layers']} "
             f"layers; preference: {result['contrast']}; random control: {len(draws)} draw(s), {_seeds(draws)})", "",
             f"Answer-token loss on {q['image']} image questions and {q['text_only']} text-only questions.", "",
             "| mask | image loss | Δ image | text-only loss | Δ text-only | Δ image - Δ text-only |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| none | {_cell(result['baseline']['image'])} | | {_cell(result['baseline']['text_only'])} | | |"]

    def row(label: str, m: dict, std: dict | None = None) -> str:
        std = std or {}
        return (f"| {label} | {_cell(m['loss']['image'])} | {_cell(m['delta']['image'], True, std.get('image'))} | "
                f"{_cell(m['loss']['text_only'])} | {_cell(m['delta']['text_only'], True, std.get('text_only'))} | "
                f"{_cell(m['image_minus_text'], True, std.get('image_minus_text'))} |")

    for name, m in result["masks"].items():
        if name != "random" or len(draws) == 1:
            lines.append(row(name, m))
        else:
            lines.append(row(f"random (mean ± std of {len(draws)} draws)", m, m.get("std")))
            lines += [row(f"random, seed {d['seed']}", d) for d in draws]
    lines += ["", _reading(result)]
    return "\n".join(lines)


def _reading(result: dict) -> str:
    """What the table shows, as far as the random draws allow. Rule (SPREAD_STDS = 2): a preferred
    mask's Δ image - Δ text-only counts as beyond the control when it lies outside the draws' mean
    ± 2 sample std, above it for the image-preferred mask, below it for the text-preferred one.
    Without a spread (one draw, or draws with one figure) only the order is stated, with a caveat."""
    masks, draws = result["masks"], _draws(result)
    image, text = masks["image_preferred"]["image_minus_text"], masks["text_preferred"]["image_minus_text"]
    control = [d["image_minus_text"] for d in draws]
    if image is None or text is None or None in control:
        return "No reading: a group of questions is missing."
    spread, n = _spread(control), len(control)
    mean, std = spread["mean"], spread["std"]
    if not std:  # one draw, or draws that all gave the same figure: no spread to compare with
        split = image > mean > text
        head = ("Consistent with a causal split" if split else "No causal split shown") + (
            f": Δ image - Δ text-only is {image:+.4f} masking the image-preferred experts, "
            f"{text:+.4f} masking the text-preferred ones and ")
        if n == 1:
            return (head + f"{mean:+.4f} masking random ones. One random draw gives the control no spread, so "
                    "differences of a few hundredths are not evidence on their own; more draws (`--ablate-draws`, "
                    "compare's `masking_draws`) give it one, and `mm-teamlora compare` repeats the test over seeds.")
        return (head + f"{mean:+.4f} in each of {n} random draws. The draws gave no spread (with few experts they "
                "can mask the same ones), so differences of a few hundredths are not evidence on their own.")
    low, high = mean - SPREAD_STDS * std, mean + SPREAD_STDS * std
    place = lambda v: "above" if v > high else "below" if v < low else "inside"  # noqa: E731
    beyond = {"image": image > high, "text": text < low}
    if all(beyond.values()):
        head = ("Consistent with a causal split: both preferred masks lie beyond the random control, each on the "
                "side a split predicts")
    elif any(beyond.values()):
        which = "image" if beyond["image"] else "text"
        head = (f"Partly consistent with a causal split: only the {which}-preferred masks lie beyond the random "
                "control on the side a split predicts")
    else:
        head = ("No causal split shown: neither preferred mask lies beyond the random control on the side a split "
                "predicts")
    return (f"{head}. Δ image - Δ text-only is {mean:+.4f} ± {std:.4f} (mean ± sample std) over {n} random "
            f"draws ({_seeds(draws)}), giving the band mean ± {SPREAD_STDS} std = [{low:+.4f}, {high:+.4f}]; "
            f"{image:+.4f} masking the image-preferred experts ({place(image)} the band) and {text:+.4f} masking the "
            f"text-preferred ones ({place(text)} the band). Rule: a preferred mask counts when it lies outside the "
            "band, above it for the image-preferred mask, below it for the text-preferred one. "
            f"{n} draws estimate that spread roughly, and it covers only which experts are masked, on these questions "
            "of this checkpoint: not other questions or training seeds (`mm-teamlora compare` repeats the test over "
            "seeds).")
