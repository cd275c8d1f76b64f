"""PNG heatmaps of routing.json: layers x experts, one per token group (mean router probability
phi) and one per pair of groups (the difference of their mean router probabilities), plus the
per-layer separation (headline JS divergence and mutual information). Needs matplotlib (Agg)."""

from __future__ import annotations

import os

PAIRS = (("image", "text_only"), ("text_with_image", "text_only"), ("image", "text_with_image"))


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("routing plots need matplotlib (pip install 'matplotlib>=3.8,<4'); "
                          "or run without plots") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the prefix they all share (e.g. 'model.layers.')."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]
    return [n[len(prefix):] or n for n in names]


def _tick_step(count: int, most: int = 60) -> int:
    """Label every n-th layer so that at most `most` labels show (a 30-block LM has 210 layers)."""
    return max(1, -(-count // most))


def _matrix(layers: dict, value) -> list[list[float]]:
    """Rows of one value per expert; layers with fewer experts are padded with NaN."""
    width = max(entry["num_experts"] for entry in layers.values())
    rows = []
    for entry in layers.values():
        row = value(entry)
        rows.append(list(row) + [float("nan")] * (width - len(row)) if row is not None else [float("nan")] * width)
    return rows


def _heatmap(plt, matrix, names, title, path, diverging: bool) -> str:
    import numpy as np

    data = np.array(matrix, dtype=float)
    height = min(18.0, max(2.5, 0.22 * len(names) + 1.4))
    fig, ax = plt.subplots(figsize=(max(3.5, 0.55 * data.shape[1] + 3.2), height))
    if diverging:
        limit = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
        image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-limit or -1, vmax=limit or 1)
    else:
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(data)), 1e-9))
    ax.set_xticks(range(data.shape[1]), [f"E{e}" for e in range(data.shape[1])])
    step = _tick_step(len(names))
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=7 if len(names) > 20 else 8)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing(result: dict, out_dir: str, prefix: str = "routing") -> list[str]:
    """Write the heatmaps of a routing.json dict into `out_dir`; returns their paths."""
    plt = _matplotlib()
    layers = result["layers"]
    names = _short_names(list(layers))
    present = [g for g in ("image", "text_with_image", "text_only") if any(g in e["groups"] for e in layers.values())]
    paths = []
    for group in present:
        matrix = _matrix(layers, lambda e: e["groups"].get(group, {}).get("mean_router_prob"))
        paths.append(_heatmap(plt, matrix, names, f"mean router probability: {group} tokens",
                              os.path.join(out_dir, f"{prefix}_{group}.png"), diverging=False))
    for a, b in PAIRS:
        if a in present and b in present:
            def diff(e, a=a, b=b):
                if a not in e["groups"] or b not in e["groups"]:
                    return None
                return [x - y for x, y in zip(e["groups"][a]["mean_router_prob"], e["groups"][b]["mean_router_prob"])]

            paths.append(_heatmap(plt, _matrix(layers, diff), names, f"router probability: {a} minus {b}",
                                  os.path.join(out_dir, f"{prefix}_diff_{a}_vs_{b}.png"), diverging=True))
    paths.append(_separation_plot(plt, layers, names, os.path.join(out_dir, f"{prefix}_separation.png")))
    return paths


def _separation_plot(plt, layers: dict, names: list[str], path: str) -> str:
    seps = [e["separation"] for e in layers.values()]
    headline = next((s["headline"] for s in seps if s["headline"]), None)
    fig, ax = plt.subplots(figsize=(min(16.0, max(4.0, 0.25 * len(names) + 2.0)), 3.6))
    x = range(len(names))
    ms = 3 if len(names) > 60 else 6
    if headline:
        ax.plot(x, [s["js_bits"].get(headline, float("nan")) for s in seps], "o-", ms=ms, label=f"JS {headline}")
    ax.plot(x, [s["mi_soft_bits"] for s in seps], "s--", ms=ms, label="MI(expert; group), soft")
    ax.plot(x, [s["mi_top1_bits"] for s in seps], "^:", ms=ms, label="MI(expert; group), top-1")
    step = _tick_step(len(names))
    ax.set_xticks(list(x)[::step], names[::step], rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_title("separation per adapted layer", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
