"""The reports written from the summary: compare.json, compare.md (tables and plain words on the
seed spread), compare.png (needs matplotlib), and the cells the CLI's table shares with them."""

from __future__ import annotations

import json
import logging
import os

from ..files import atomic_write_text
from .config import ROUTED

logger = logging.getLogger(__name__)


def write_reports(summary: dict, out: str) -> dict[str, str]:
    """compare.json, compare.md and (with matplotlib) compare.png in `out`; their paths by kind."""
    json_path, md_path = os.path.join(out, "compare.json"), os.path.join(out, "compare.md")
    atomic_write_text(json_path, json.dumps(summary, indent=1) + "\n")
    atomic_write_text(md_path, format_markdown(summary))
    paths = {"json": json_path, "md": md_path}
    try:
        paths["plot"] = plot(summary, os.path.join(out, "compare.png"))
    except ImportError as e:
        logger.warning("no compare.png: %s", e)
    return paths


def plot(summary: dict, path: str) -> str:
    """compare.png: vanilla and circular accuracy per method (mean, error bars: std over seeds)
    with chance, and tokens/s relative to LoRA. Needs matplotlib."""
    from ..eval.plots import _matplotlib
    from ..files import atomic_write

    plt = _matplotlib()
    names = list(summary["methods"])
    rows = list(summary["methods"].values())
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 3.6))
    for offset, metric, chance in ((-0.2, "vanilla", summary["chance"]), (0.2, "circular", summary["chance_circular"])):
        means = [100 * (a[metric]["mean"] or 0.0) for a in rows]
        errors = [100 * (a[metric]["std"] or 0.0) for a in rows]
        bars = acc.bar([i + offset for i in range(len(names))], means, 0.4, yerr=errors, capsize=3, label=metric)
        acc.axhline(100 * chance, ls="--", lw=1, color=bars.patches[0].get_facecolor(), label=f"{metric} chance")
    acc.set_xticks(range(len(names)), names)
    acc.set_ylabel("accuracy %")
    acc.set_title(f"{summary['questions']} questions, {len(summary['config']['seeds'])} seed(s)")
    acc.legend(fontsize=7)
    ratios = [a["tokens_per_s_vs_lora"] or 0.0 for a in rows]
    speed.bar(range(len(names)), ratios, 0.6)
    speed.axhline(1.0, ls="--", lw=1, color="grey")
    speed.set_xticks(range(len(names)), names)
    speed.set_ylabel("training tokens/s vs LoRA")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    """A mean +- std cell (of `mean_std`), times `scale`; "-" when nothing was measured."""
    if stat["mean"] is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if stat["std"] is not None else "")


def ratio(value: float | None) -> str:
    """A ratio cell: 1.23x, or "-"."""
    return "-" if value is None else f"{value:.2f}x"


def format_markdown(summary: dict) -> str:
    """compare.md: what was compared and how, the tables, and plain words on the seed spread."""
    c = summary["config"]
    methods = summary["methods"]
    seeds = c["seeds"]
    lines = [f"# mm-teamlora compare: {', '.join(methods)} at matched trainable parameters", "",
             f"- base run: `{summary['base_run']}`; eval: `{summary['eval_data']}` ({summary['questions']} "
             f"questions, likelihood, CircularEval over every rotation)",
             f"- seeds {seeds} for every method (data order, dropout and adapter initialisation); "
             f"{'the same' if summary['same_steps'] else 'NOT the same'} optimizer steps for every run: "
             f"{', '.join(map(str, summary['steps']))} (never a time budget)",
             f"- parameters matched to {summary['reference']}'s {summary['reference_adapter_parameters']:,} adapter "
             f"parameters over {summary['adapted_layers']} adapted layers (counted on the model training builds)",
             "- alpha: " + (f"each method gets the reference's update gain {summary['reference_gain']:g} at uniform "
                            "routing" if c["alpha_policy"] == "gain" else "the base run's alpha for every method")
             + (", times the multiplier the alpha grid chose on the validation split" if summary["alpha_grid"] else
                "; no alpha grid was run"),
             f"- chance: {100 * summary['chance']:.1f}% vanilla, {100 * summary['chance_circular']:.2f}% circular", "",
             "## Accuracy and cost", "",
             "| method | r | k | alpha | gain | adapter params | vs ref | trainable | vanilla % | circular % | "
             "tokens/s | tokens/s vs LoRA | train time vs LoRA | peak mem MB | routing JS bits | routing MI bits |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, a in methods.items():
        lines.append(f"| {name} | {a['r']} | {a['num_experts'] if a['method'] in ROUTED else '-'} | {a['alpha']:g} | "
                     f"{a['effective_gain']:g} | {a['adapter_parameters']:,} | {a['vs_reference']:.3f} | "
                     f"{a['trainable_parameters']:,} | {pm(a['vanilla'])} | {pm(a['circular'])} | "
                     f"{pm(a['tokens_per_s'], 1.0, 0)} | {ratio(a['tokens_per_s_vs_lora'])} | "
                     f"{ratio(a['train_time_vs_lora'])} | {pm(a['peak_mem_mb'], 1.0, 0)} | "
                     f"{pm(a['routing_js_bits'], 1.0, 3)} | {pm(a['routing_mi_soft_bits'], 1.0, 3)} |")
    lines += ["", f"Mean ± sample std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
              f"{' (one seed: no spread)' if len(seeds) == 1 else ''}. Train time: the training loops' time over "
              "every sitting (validation and saves included, start-up not); tokens/s: the tokens of those loops "
              "(all ranks) over that time; "
              "peak memory: rank 0's, as the training metrics record it. Routing: image vs text tokens, mean over "
              "adapted layers, on router probabilities."]
    lines += binding_lines({**methods, **summary["ablations"]})
    if summary.get("feature_cache"):
        lines += ["", "The vision feature cache was on: the first run to train computed the tower's features of "
                  "the images, later runs read them, so the time and tokens/s ratios favour the runs trained later "
                  f"(order: {', '.join(methods)}, seed by seed within each method)."]
    lines += ["", "## Inside the seed spread?", ""]
    for key, verdicts in summary["comparisons"].items():
        ref, other = key.split("_vs_")
        for metric, v in verdicts.items():
            lines.append(verdict_line(ref, other, metric, v))
    if not summary["comparisons"]:
        lines.append(f"- the reference ({summary['reference']}) is not among the methods: no comparison made")
    categories = sorted({cat for a in methods.values() for cat in a["by_category"]})
    if categories:
        lines += ["", "## By category (vanilla % / circular %)", "",
                  "| category | n | " + " | ".join(methods) + " |", "| --- | ---: |" + " --- |" * len(methods)]
        for cat in categories:
            n = next(a["by_category"][cat]["n"] for a in methods.values() if cat in a["by_category"])
            cells = [f"{pm(a['by_category'][cat]['vanilla'])} / {pm(a['by_category'][cat]['circular'])}"
                     if cat in a["by_category"] else "-" for a in methods.values()]
            lines.append(f"| {cat} | {n} | " + " | ".join(cells) + " |")
    grid = summary["alpha_grid"]
    if grid:
        lines += ["", "## Alpha grid (first seed, answer-token loss on the validation split; lowest wins)", "",
                  "| method | multiplier | alpha | answer loss | val vanilla % | chosen |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for method, rows in grid["scores"].items():
            for g in rows:
                lines.append(f"| {method} | {g['multiplier']:g} | {g['alpha']:g} | {g['answer_loss']:.4f} | "
                             f"{100 * g['val_vanilla']:.1f} | {'yes' if g['multiplier'] == grid['chosen'][method] else ''} |")
    else:
        lines += ["", "No alpha grid was run: every method uses the alpha above (gain-matched or the base alpha)."]
    if summary["ablations"]:
        lines += ["", f"## Ablations (seed {seeds[0]}, against the same seed's run)", "",
                  "| ablation | against | r | k | adapter params | vanilla % | circular % | tokens/s vs against | "
                  "routing JS bits |", "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
        for name, a in summary["ablations"].items():
            lines.append(f"| {name} | {a.get('against', '-')} | {a['r']} | {a['num_experts']} | "
                         f"{a['adapter_parameters']:,} | {pm(a['vanilla'])} | {pm(a['circular'])} | "
                         f"{ratio(a.get('tokens_per_s_vs_against'))} | {pm(a['routing_js_bits'], 1.0, 3)} |")
        lines.append("")
        for name, a in summary["ablations"].items():
            for metric, v in (a.get("verdict") or {}).items():
                lines.append(verdict_line(name, a["against"], metric, v))
    else:
        lines += ["", "No ablations were run."]
    lines += masking_lines({**summary["methods"], **summary["ablations"]})
    if summary["not_done"]:
        lines += ["", "Not yet measured by this command: " + "; ".join(summary["not_done"]) + "."]
    lines.append("")
    return "\n".join(lines)


def binding_lines(rows: dict) -> list[str]:
    """compare.md's lines on the binding stage each run trained first (nothing without one)."""
    staged = {name: a["binding"] for name, a in rows.items() if a.get("binding")}
    if not staged:
        return []
    target = next(iter(staged.values()))["target"]
    lines = ["", f"Each run first trained its own binding stage (text-only lettered questions whose hint states the "
             f"answer, at a constant rate) until the answer loss on held-out binding records fell to {target:g} "
             "(chance ~0.69) or its cap, then the steps above from that checkpoint; the table's time and tokens/s "
             "are the main stage's alone.", "",
             "| run | binding steps | held-out answer loss | reached the target | binding seconds |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, b in staged.items():
        lines.append(f"| {name} | {pm(b['steps'], 1.0, 0)} | {pm(b['val_loss'], 1.0, 3)} | {b['reached']} of "
                     f"{b['runs']} | {pm(b['seconds'], 1.0, 0)} |")
    return lines


def signed(stat: dict, digits: int = 3) -> str:
    """A signed mean +- std cell (of `mean_std`), e.g. a loss delta; "-" when nothing was measured."""
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:+.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def masking_lines(rows: dict) -> list[str]:
    """compare.md's section on the causal masking test: per routed run label, the answer-token
    loss deltas (mean ± std over seeds) on image / text-only questions for each mask."""
    tested = {name: a["masking"] for name, a in rows.items() if a.get("masking")}
    lines = ["", "## Expert masking (causal masking test of the visual / textual split)", ""]
    if not tested:
        return lines + ["No routed run has an expert-masking test."]
    first = next(iter(tested.values()))
    lines += [f"Per adapted layer, {first['experts_per_layer']} expert(s) masked (renormalised over the rest): those "
              f"image tokens prefer most ({first['contrast']}, mean router probabilities), those text tokens prefer, "
              f"or random ones (the control, the mean of {first.get('random_draws', 1)} draw(s) per run); "
              f"Δ answer-token loss (masked - unmasked) on {first['questions']['image']} image and {first['questions']['text_only']} text-only questions of the routing sample, mean ± std "
              "over seeds. Δ img - Δ text > 0: the mask hurts image questions more.", "",
              "| run | seeds | loss image / text-only | mask | Δ image | Δ text-only | Δ img - Δ text |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
    words = []
    for name, m in tested.items():
        base = f"{pm(m['baseline']['image'], 1.0, 3)} / {pm(m['baseline']['text_only'], 1.0, 3)}"
        for i, (mask, d) in enumerate(m["masks"].items()):
            lines.append(f"| {name if i == 0 else ''} | {m['runs'] if i == 0 else ''} | {base if i == 0 else ''} | "
                         f"{mask} | {signed(d['image'])} | {signed(d['text_only'])} | "
                         f"{signed(d['image_minus_text'])} |")
        words.append(_masking_words(name, m["masks"], m.get("random_std")))
    return lines + [""] + words


def _masking_words(name: str, masks: dict, random_std: float | None = None) -> str:
    """Whether the image- and text-preferred masks differ from the random control beyond the seed
    spread; with one seed, beyond the random draws' mean ± 2 std (`eval.ablation`'s rule)."""
    from ..eval.ablation import SPREAD_STDS

    control = masks.get("random", {}).get("image_minus_text")
    parts = []
    for mask, sign in (("image_preferred", 1), ("text_preferred", -1)):
        d = masks.get(mask, {}).get("image_minus_text")
        if not d or d["mean"] is None or not control or control["mean"] is None:
            parts.append(f"{mask}: not measured")
            continue
        gap = d["mean"] - control["mean"]
        spread = None if d["std"] is None or control["std"] is None else d["std"] + control["std"]
        direction = "as a causal split predicts" if sign * gap > 0 else "against what a causal split predicts"
        if spread is not None:
            where = f"{'INSIDE' if abs(gap) <= spread else 'outside'} the seed spread ± {spread:.3f}"
        elif random_std:
            band = SPREAD_STDS * random_std
            where = (f"one seed; {'INSIDE' if abs(gap) <= band else 'outside'} the random draws' "
                     f"± {SPREAD_STDS} std = ± {band:.3f}")
        else:
            where = "one seed and one random draw: no spread measured"
        parts.append(f"{mask} {gap:+.3f} vs random ({direction}; {where})")
    return f"- {name}, Δ img - Δ text against the random control: " + "; ".join(parts)


def verdict_line(a: str, b: str, metric: str, v: dict) -> str:
    """One plain-words line of `verdict`'s answer: accuracy in points, tokens/s in tokens/s and %."""
    speed = metric == "tokens_per_s"
    name = "tokens/s" if speed else f"{metric} accuracy"
    if v["delta"] is None:
        return f"- {a} vs {b}, {name}: not measured"
    if speed:
        size = f"{v['delta']:+.0f} tokens/s"
        if v.get("relative") is not None:
            size += f" ({100 * v['relative']:+.1f}%)"
        spread = f" (± {v['spread']:.0f})" if "spread" in v else ""
    else:
        size = f"{100 * v['delta']:+.1f} points"
        spread = f" (± {100 * v['spread']:.1f})" if "spread" in v else ""
    if v["inside"] is None:
        return (f"- {a} vs {b}, {name}: {size}, one seed: no spread measured, so not a difference this "
                "comparison can claim")
    where = "INSIDE" if v["inside"] else "outside"
    basis = "seed spread" if v["basis"] == "seed spread" else "single runs’ 95% intervals"
    return (f"- {a} vs {b}, {name}: {size}, {where} the {basis}" + (spread or " (one seed: no seed spread measured)")
            + (": not a difference this comparison can claim" if v["inside"] else ""))
