"""What a run records on rank 0: `metrics.jsonl` (one JSON object per logged step or validation),
TensorBoard event files under `tb/`, and `loss_curve.png` at the end.

A training record: step, epoch, loss (cross-entropy per supervised token of the step, over every
rank), aux_loss, lr per parameter group, grad_norm, tokens_per_s (non-padding tokens the language
model ran, image tokens included, per second of wall time, summed over ranks), supervised_tokens,
tokens_by_group, loss_by_source, and at routing steps the expert usage by token group. A
validation record has "split": "val" with val_loss and val_loss_by_source.
"""

from __future__ import annotations

import json
import logging
import math
import os

logger = logging.getLogger(__name__)
METRICS_FILE, TB_DIR, CURVE_FILE = "metrics.jsonl", "tb", "loss_curve.png"


class MetricsLog:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: int = 0):
        self.path = os.path.join(run_dir, METRICS_FILE)
        _truncate_after(self.path, resume_step)  # records a killed run wrote past its last checkpoint
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: no event files (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(os.path.join(run_dir, TB_DIR), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = "val/" if record.get("split") == "val" else "train/"
            for key, value in _scalars(record):
                self.tb.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if key in ("step", "split"):
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield prefix + key, value


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) != len(records):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_loss_curve(run_dir: str) -> str | None:
    """Training loss per logged step and validation loss, as `loss_curve.png`."""
    records = read_metrics(os.path.join(run_dir, METRICS_FILE))
    train = [(r["step"], r["loss"]) for r in records if r.get("split") != "val" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (per supervised token)", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(run_dir, CURVE_FILE)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_routing(usage: dict) -> str:
    """One line of mean router probability per expert by token group, e.g.
    `experts by group: image [.31 .22 .25 .22] | text_with_image [...] | text_only [...]`."""
    parts = [f"{group} [{' '.join(f'{p:.2f}' for p in probs)}]" for group, probs in usage["mean_router_prob"].items()]
    line = "experts by group (mean router prob over layers): " + " | ".join(parts)
    if usage.get("js_image_text") is not None:
        line += f"; JS image vs text {usage['js_image_text']:.3f} bits"
    return line
