"""compare.json's content: per-run rows, mean +- std over seeds per method, ratios to LoRA, the
seed-spread verdicts, the ablations against the same seed's run and the expert-masking test of the
routed runs (loss deltas, mean over seeds)."""

from __future__ import annotations

import math
import os

from .config import CompareConfig
from .plan import RunSpec


# what the reference is compared with every other method on: accuracy, and the paper's speed claim
VERDICT_METRICS = ("vanilla", "circular", "tokens_per_s")


def mean_std(values: list[float | None]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values)}


def _routing_summary(routing: dict | None) -> dict | None:
    if not routing:
        return None
    sep = routing.get("separation") or {}
    return {"headline": sep.get("headline"), "js_bits": sep.get("mean_headline_js_bits"),
            "mi_soft_bits": sep.get("mean_mi_soft_bits"), "mi_top1_bits": sep.get("mean_mi_top1_bits"),
            "samples": routing.get("samples"), "masking": _masking_summary(routing.get("ablation"))}


def _masking_summary(ablation: dict | None) -> dict | None:
    """The expert-masking test of one run: baseline losses and, per mask, the loss deltas (random:
    the mean of its `random_draws` draws; `random_std`: their sample std of Δ image - Δ text-only,
    None for one draw)."""
    if not ablation or "masks" not in ablation:
        return None
    random_std = (ablation["masks"].get("random", {}).get("std") or {}).get("image_minus_text")
    return {"baseline": ablation["baseline"], "questions": ablation["questions"],
            "experts_per_layer": ablation["experts_per_layer"], "contrast": ablation["contrast"],
            "random_draws": ablation.get("random_draws", 1), "random_std": random_std,
            "masks": {name: {**m["delta"], "image_minus_text": m["image_minus_text"]}
                      for name, m in ablation["masks"].items()}}


def masking_means(rows: list[dict]) -> dict | None:
    """Mean +- std over seeds of the masking test's baseline losses and per-mask deltas
    (image, text_only, image_minus_text), and the random draws' std within a run (mean over runs);
    None when no run of `rows` has one."""
    tests = [(r["routing"] or {}).get("masking") for r in rows]
    tests = [t for t in tests if t]
    if not tests:
        return None
    names = list(tests[0]["masks"])
    return {"runs": len(tests), "experts_per_layer": tests[0]["experts_per_layer"], "contrast": tests[0]["contrast"],
            "questions": tests[0]["questions"], "random_draws": tests[0].get("random_draws", 1),
            "random_std": mean_std([t.get("random_std") for t in tests])["mean"],
            "baseline": {kind: mean_std([t["baseline"][kind] for t in tests]) for kind in ("image", "text_only")},
            "masks": {name: {key: mean_std([t["masks"][name][key] for t in tests if name in t["masks"]])
                             for key in ("image", "text_only", "image_minus_text")} for name in names}}


def _run_row(result: dict) -> dict:
    spec, report = result["spec"], result["report"]
    overall = report["overall"]
    return {"run": spec.name, "seed": spec.seed, "alpha": spec.alpha, "vanilla": overall["vanilla"],
            "circular": overall["circular"], "vanilla_ci95": overall["vanilla_ci95"],
            "circular_ci95": overall["circular_ci95"], "n": overall["n"],
            "by_category": {c: {"vanilla": b["vanilla"], "circular": b["circular"], "n": b["n"]}
                            for c, b in report.get("by_category", {}).items()},
            "training": result["training"], "routing": _routing_summary(result["routing"])}


def _aggregate(label: str, rows: list[dict], entry: dict) -> dict:
    categories = sorted({c for r in rows for c in r["by_category"]})
    return {"label": label, "method": entry["method"], "r": entry["r"], "num_experts": entry["num_experts"],
            "alpha": rows[0]["alpha"], "effective_gain": entry["effective_gain"] * rows[0]["alpha"] / entry["alpha"],
            "adapter_parameters": entry["adapter_parameters"], "trainable_parameters": entry["trainable_parameters"],
            "trainable_percent": entry["trainable_percent"], "vs_reference": entry["vs_reference"],
            "seeds": [r["seed"] for r in rows], "n": rows[0]["n"],
            "vanilla": mean_std([r["vanilla"] for r in rows]), "circular": mean_std([r["circular"] for r in rows]),
            "by_category": {c: {"n": next(r["by_category"][c]["n"] for r in rows if c in r["by_category"]),
                                "vanilla": mean_std([r["by_category"].get(c, {}).get("vanilla") for r in rows]),
                                "circular": mean_std([r["by_category"].get(c, {}).get("circular") for r in rows])}
                            for c in categories},
            "tokens_per_s": mean_std([r["training"]["tokens_per_s"] for r in rows]),
            "train_seconds": mean_std([r["training"]["train_seconds"] for r in rows]),
            "peak_mem_mb": mean_std([r["training"]["peak_mem_mb"] for r in rows]),
            "steps": sorted({r["training"]["total_steps"] for r in rows}),
            "binding": _binding_means(rows),
            "routing_js_bits": mean_std([(r["routing"] or {}).get("js_bits") for r in rows]),
            "routing_mi_soft_bits": mean_std([(r["routing"] or {}).get("mi_soft_bits") for r in rows]),
            "masking": masking_means(rows), "runs": rows}


def _binding_means(rows: list[dict]) -> dict | None:
    """Mean +- std over seeds of the runs' binding stages (steps, held-out answer loss, seconds) and
    how many reached the target; None without a binding stage."""
    stages = [r["training"].get("binding") for r in rows]
    stages = [b for b in stages if b]
    if not stages:
        return None
    return {"runs": len(stages), "reached": sum(b["reached"] for b in stages), "target": stages[0]["target"],
            **{key: mean_std([b[key] for b in stages]) for key in ("steps", "val_loss", "seconds")}}


def verdict(a: dict, b: dict, metric: str) -> dict:
    """Whether `a`'s and `b`'s `metric` differ by more than their seed spread. With 2+ seeds each:
    outside when |mean_a - mean_b| > std_a + std_b. With one seed there is no spread: for accuracy
    the Wilson 95% intervals of the single runs stand in (outside when they do not overlap); a
    metric without intervals (tokens/s) gets no verdict (`inside` None)."""
    ma, mb = a[metric]["mean"], b[metric]["mean"]
    if ma is None or mb is None:
        return {"delta": None, "inside": None, "basis": "not measured"}
    delta = ma - mb
    found = {"delta": delta, "relative": delta / mb if mb else None}
    if a[metric]["std"] is not None and b[metric]["std"] is not None:
        spread = a[metric]["std"] + b[metric]["std"]
        return {**found, "inside": abs(delta) <= spread, "basis": "seed spread", "spread": spread}
    if f"{metric}_ci95" not in a["runs"][0]:
        return {**found, "inside": None, "basis": "one seed: no spread measured"}
    ca, cb = a["runs"][0][f"{metric}_ci95"], b["runs"][0][f"{metric}_ci95"]
    overlap = ca[0] <= cb[1] and cb[0] <= ca[1]
    return {**found, "inside": overlap, "basis": "one seed: Wilson 95% intervals (no seed spread measured)"}


def summarise(config: CompareConfig, the_plan: dict, main: list[RunSpec], ablations: list[RunSpec], results: dict,
              grid: dict, chosen: dict) -> dict:
    methods = {}
    for method in config.methods:
        rows = [_run_row(results[s.name]) for s in main if s.label == method]
        methods[method] = _aggregate(method, rows, the_plan["entries"][method])
    lora = methods.get("lora")
    for agg in methods.values():
        agg["tokens_per_s_vs_lora"] = (agg["tokens_per_s"]["mean"] / lora["tokens_per_s"]["mean"]
                                       if lora and lora["tokens_per_s"]["mean"] and agg["tokens_per_s"]["mean"]
                                       else None)
        agg["train_time_vs_lora"] = (agg["train_seconds"]["mean"] / lora["train_seconds"]["mean"]
                                     if lora and lora["train_seconds"]["mean"] else None)
    reference = the_plan["reference"]
    comparisons = {}
    if reference in methods:
        for method, agg in methods.items():
            if method != reference:
                comparisons[f"{reference}_vs_{method}"] = {
                    m: verdict(methods[reference], agg, m) for m in VERDICT_METRICS}
    ablation_rows = {}
    for spec in ablations:
        agg = _aggregate(spec.label, [_run_row(results[spec.name])], the_plan["entries"][spec.label])
        against = "moelora" if spec.label == "moelora_loop" else reference
        if against in methods:
            same_seed = dict(methods[against])
            same_seed["runs"] = [r for r in methods[against]["runs"] if r["seed"] == spec.seed]
            for m in ("vanilla", "circular"):
                same_seed[m] = mean_std([r[m] for r in same_seed["runs"]])
            agg["against"] = against
            agg["verdict"] = {m: verdict(agg, same_seed, m) for m in ("vanilla", "circular")}
            base_rate = mean_std([r["training"]["tokens_per_s"] for r in same_seed["runs"]])["mean"]
            agg["tokens_per_s_vs_against"] = (agg["tokens_per_s"]["mean"] / base_rate
                                              if base_rate and agg["tokens_per_s"]["mean"] else None)
        ablation_rows[spec.label] = agg
    steps = sorted({s for agg in [*methods.values(), *ablation_rows.values()] for s in agg["steps"]})
    first_report = results[main[0].name]["report"]["overall"]
    return {"format": "mm_teamlora.compare/1", "config": config.to_dict(), "base_run": the_plan["base_run"],
            "eval_data": os.path.abspath(config.eval_path), "reference": reference,
            "reference_adapter_parameters": the_plan["reference_adapter_parameters"],
            "reference_gain": the_plan["reference_gain"], "adapted_layers": the_plan["layers"],
            "steps": steps, "same_steps": len(steps) == 1,
            "feature_cache": bool(the_plan["key"]["base"].get("feature_cache")),
            "chance": first_report["chance"], "chance_circular": first_report["chance_circular"],
            "questions": first_report["n"], "methods": methods, "comparisons": comparisons,
            "alpha_grid": {"multipliers": config.alpha_grid, "scores": grid, "chosen": chosen} if grid else None,
            "ablations": ablation_rows, "not_done": []}
