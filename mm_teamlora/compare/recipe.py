"""`run_compare`, the phases in order (see the package doc): the plan, the alpha grid, training every
run, then, once all have trained, the evaluation and the reports."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..files import atomic_write_text
from .config import ROUTED, CompareConfig, CompareConfigError
from .evaluation import evaluate_run, score_on_val
from .plan import choose_multiplier, grid_runs, later_runs, plan
from .report import pm, ratio, signed, write_reports
from .runs import train_run, training_figures
from .summary import summarise

logger = logging.getLogger(__name__)


@dataclass
class CompareResult:
    out: str
    summary: dict  # compare.json's content
    trained: list[str] = field(default_factory=list)  # runs trained in this call (the others were reused)
    paths: dict[str, str] = field(default_factory=dict)


def run_compare(config: CompareConfig) -> CompareResult:
    """Run (or continue) the comparison; see the package doc. Raises CompareError when a run fails."""
    config.validate()
    os.makedirs(config.out, exist_ok=True)
    atomic_write_text(os.path.join(config.out, "compare_config.yaml"), config.to_yaml())
    if config.demo_data:
        from ..demo import ensure_data

        ensure_data(config.demo_data)
    for what, path in (("eval_data", config.eval_path), ("val_data", config.val_path if config.alpha_grid else ""),
                       ("binding_data", config.binding_path if config.binding_steps else "")):
        if path and not os.path.isfile(path):
            hint = ("; demo data built with --binding-size 0 have none: rebuild them, or set binding_steps: 0"
                    if what == "binding_data" and not config.binding_data else "")
            raise CompareConfigError(f"compare config: {what}: {path} not found{hint}")
    the_plan = plan(config)
    _check_masking(config, the_plan)
    trained: list[str] = []

    # alpha grid: every method at every multiplier, first seed, scored on the validation TSV
    chosen = {m: 1.0 for m in config.methods}
    grid: dict[str, list[dict]] = {}
    for method, specs in grid_runs(config, the_plan).items():
        for spec in specs:
            if train_run(config, spec):
                trained.append(spec.name)
            score = score_on_val(config, spec)
            grid.setdefault(method, []).append({"multiplier": spec.multiplier, "alpha": spec.alpha, "run": spec.name,
                                                "answer_loss": score["answer_loss"], "val_questions": score["questions"],
                                                "val_vanilla": score["vanilla"]})
        best = choose_multiplier(grid[method])
        chosen[method] = best["multiplier"]
        logger.info("alpha grid: %s takes alpha %g (x%g), answer loss %.4f on %d validation questions", method,
                    best["alpha"], best["multiplier"], best["answer_loss"], best["val_questions"])

    # the grid run at the chosen multiplier is the first seed's main run: the same name and folder
    main, ablations = later_runs(config, the_plan, chosen)
    for spec in [*main, *ablations]:
        if train_run(config, spec):
            trained.append(spec.name)

    # the eval TSV is read only now, once every run has trained
    results = {}
    for spec in [*main, *ablations]:
        results[spec.name] = {"spec": spec, **evaluate_run(config, spec), "training": training_figures(spec)}
    summary = summarise(config, the_plan, main, ablations, results, grid, chosen)
    paths = write_reports(summary, config.out)
    return CompareResult(config.out, summary, trained, paths)


def _check_masking(config: CompareConfig, the_plan: dict) -> None:
    """The masking test needs an expert left unmasked in every routed run: say so before training."""
    for label, entry in the_plan["entries"].items():
        if entry["method"] in ROUTED and config.masking_experts >= entry["num_experts"]:
            raise CompareConfigError(f"compare config: masking_experts: {config.masking_experts} of {label}'s "
                                     f"{entry['num_experts']} experts would leave none to route to; "
                                     f"use fewer than {entry['num_experts']}")


def format_table(result: CompareResult) -> str:
    """What the CLI prints: the accuracy table, a line per routed method on the expert-masking test
    (compare.json's `masking`, mean over seeds: Δ image / Δ text-only answer loss per mask), and where
    the reports are."""
    s = result.summary
    lines = [f"{'method':12} {'params':>12} {'vanilla %':>14} {'circular %':>14} {'tok/s vs LoRA':>14}"]
    for name, a in s["methods"].items():
        lines.append(f"{name:12} {a['adapter_parameters']:>12,} {pm(a['vanilla']):>14} {pm(a['circular']):>14} "
                     f"{ratio(a['tokens_per_s_vs_lora']):>14}")
    lines.append(f"chance {100 * s['chance']:.1f}% vanilla, {100 * s['chance_circular']:.2f}% circular; "
                 f"{s['questions']} questions; steps {', '.join(map(str, s['steps']))}")
    lines += [_masking_line(name, a.get("masking")) for name, a in s["methods"].items() if name in ROUTED]
    lines.append(f"trained now: {', '.join(result.trained) or 'nothing (every run had finished)'}")
    lines += [f"  {k:5} {v}" for k, v in result.paths.items()]
    return "\n".join(lines)


def _masking_line(name: str, masking: dict | None) -> str:
    if not masking:
        return f"{name:12} masking: not run (its routing/ablation.json says why)"
    deltas = ", ".join(f"{mask} {signed(d['image'])} / {signed(d['text_only'])}"
                       for mask, d in masking["masks"].items())
    return (f"{name:12} masking Δ image / Δ text-only loss: {deltas} ({masking['runs']} seed(s); "
            f"{masking['experts_per_layer']} expert(s) per layer; random: {masking['random_draws']} draw(s))")
