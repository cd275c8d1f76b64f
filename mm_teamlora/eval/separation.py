"""How far a routed adapter's experts separate token groups, per layer, from router sums alone.

Input per layer: token counts per group (G,) and, per group and expert (G, E), the sums of the
router probabilities `phi`, of the applied weights `w` and of top-1 hits (what `routing.py`
records). Separation uses `phi` only (docs/method.md, "Measuring the visual/textual split"): `phi`
is a distribution over experts, `w` is not (it can be negative and sums to k). With `P_g` the
mean router distribution of group g (sum of `phi` over its tokens / its token count):
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

import torch

from ..adapters.routing import js_divergence
from ..constants import GROUP_IMAGE, GROUP_NAMES, GROUP_TEXT_WITH_IMAGE


def group_name(g: int) -> str:
    return GROUP_NAMES.get(g, f"group{g}")


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


def layer_entry(parts: dict[str, torch.Tensor]) -> dict:
    tokens = parts["tokens"]
    groups = {}
    for g in range(tokens.shape[0]):
        n = float(tokens[g])
        if n > 0:
            groups[group_name(g)] = {"tokens": int(round(n)), "mean_router_prob": (parts["prob"][g] / n).tolist(),
                                     "mean_weight": (parts["weight"][g] / n).tolist(),
                                     "top1_share": (parts["top1"][g] / n).tolist()}
    return {"num_experts": int(parts["prob"].shape[1]), "groups": groups, "separation": separation(parts)}


def section(layers: dict[str, dict[str, torch.Tensor]], expected: torch.Tensor, samples: int) -> dict:
    entries = {name: layer_entry(parts) for name, parts in layers.items()}
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
