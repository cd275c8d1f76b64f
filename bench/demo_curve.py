"""Validation accuracy against training minutes for a demo run (not a test): how the demo's default
`--minutes` and settings were chosen, on `val.tsv` (carved from the training side), never on eval.tsv.

Train a run that keeps every checkpoint, then score each one (and the untuned start) on the
validation split, likelihood + CircularEval, and write curve.json and curve.png into --out:

    .venv/bin/mm-teamlora train data_configs/runs/demo_teamlora.yaml output_dir=runs/curve/teamlora \\
        save_steps=50 save_total_limit=0 --nproc 2
    .venv/bin/python bench/demo_curve.py --run runs/curve/teamlora --data runs/demo-data/val.tsv --out runs/curve

Minutes are each checkpoint's training time in its sitting (`sitting_seconds` of trainer_state.json),
so run the curve in one sitting.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mm_teamlora.eval import EvalConfig, evaluate
from mm_teamlora.model import MultimodalLM
from mm_teamlora.train import RunConfig
from mm_teamlora.train.checkpoint import checkpoints, read_state
from mm_teamlora.train.engine import model_config


def point(model, data: str, out_dir: str, limit: int, step: int, seconds: float) -> dict:
    report = evaluate(model, data, out_dir, EvalConfig(circular=True, limit=limit), model_name=out_dir,
                      progress=False).report
    overall = report["overall"]
    return {"step": step, "minutes": round(seconds / 60, 2), "vanilla": overall["vanilla"],
            "circular": overall["circular"], "vanilla_ci95": overall["vanilla_ci95"],
            "circular_ci95": overall["circular_ci95"], "n": overall["n"],
            "by_category": {k: v["vanilla"] for k, v in report["by_category"].items()}}


def plot(points: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [p["minutes"] for p in points]
    for key, label in (("vanilla", "vanilla"), ("circular", "CircularEval")):
        values = [100 * p[key] for p in points]
        low = [100 * (p[key] - p[f"{key}_ci95"][0]) for p in points]
        high = [100 * (p[f"{key}_ci95"][1] - p[key]) for p in points]
        ax.errorbar(minutes, values, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.axhline(25, color="grey", linestyle=":", label="vanilla chance")
    ax.set_xlabel("training minutes (this machine)")
    ax.set_ylabel("validation accuracy, % (95% Wilson interval)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder holding checkpoint-* folders")
    parser.add_argument("--data", required=True, help="the validation TSV (val.tsv of the demo data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    parser.add_argument("--no-untuned", action="store_true", help="skip the untuned starting point")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.run))
    points = []
    if not args.no_untuned:
        run = RunConfig.from_yaml(os.path.join(args.run, "run_config.yaml"))
        torch.manual_seed(run.seed)
        base = MultimodalLM.from_config(model_config(run)[0])
        points.append(point(base, args.data, os.path.join(args.out, f"{name}-step0"), args.limit, 0, 0.0))
        print(json.dumps(points[-1]), flush=True)
        del base
    for folder in checkpoints(args.run):
        state = read_state(folder)
        model = MultimodalLM.from_pretrained(folder)
        points.append(point(model, args.data, os.path.join(args.out, f"{name}-{os.path.basename(folder)}"),
                            args.limit, state["step"], state.get("sitting_seconds", 0.0)))
        print(json.dumps(points[-1]), flush=True)
    with open(os.path.join(args.out, f"{name}-curve.json"), "w", encoding="utf-8") as f:
        json.dump(points, f, indent=1)
    plot(points, os.path.join(args.out, f"{name}-curve.png"), f"{name} on {os.path.basename(args.data)}")
    print(f"{'step':>5} {'min':>6} {'vanilla':>8} {'circular':>9}")
    for p in points:
        print(f"{p['step']:>5} {p['minutes']:>6.1f} {100 * p['vanilla']:>7.1f}% {100 * p['circular']:>8.1f}%")


if __name__ == "__main__":
    main()
