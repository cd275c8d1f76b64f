"""The `eval`, `eval-score` and `inspect-routing` subcommands as plain typed functions (cli.py
wraps them). Each returns an exit code: 0 done, 1 a malformed data row under `on_error=raise`,
2 unusable arguments, files or models."""

from __future__ import annotations

import sys

DEFAULT_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _load(model: str, device: str):
    import os

    import torch

    from ..model import load_model

    loaded = load_model(model)
    local = os.environ.get("LOCAL_RANK", "0")
    target = device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    return loaded.to(target)


def _shard_from_env(shard: int, num_shards: int) -> tuple[int, int]:
    """`--num-shards 0`: one shard per process of a torchrun / deepspeed launch (RANK, WORLD_SIZE)."""
    import os

    if num_shards != 0:
        return shard, num_shards
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _summary(report: dict) -> str:
    o = report["overall"]
    text = f"n={o['n']}: vanilla {_pct(o['vanilla'])} (chance {_pct(o['chance'])})"
    if o["circular"] is not None:
        text += f", circular {_pct(o['circular'])} (chance {_pct(o['chance_circular'])})"
    return text + f"; unparsed {report['unparsed']}, missing {report['missing']}"


def eval_command(model: str = "", data: str = "", mode: str = "likelihood", circular: bool = False,
                 out: str = "runs/eval", batch_size: int = 8, template: str = "chat", max_new_tokens: int = 32,
                 instruction: str = DEFAULT_INSTRUCTION, hint: bool = True, shard: int = 0, num_shards: int = 1,
                 on_error: str = "raise", restart: bool = False, device: str = "") -> int:
    """Evaluate a model on an MMBench TSV (likelihood or generate, optional CircularEval) and write the reports.

    Writes predictions.tsv (submission columns + prediction), predictions.jsonl (the resume log),
    report.json and report.md into --out. A rerun with the same settings resumes; --shard K
    --num-shards N runs one shard (merge the shards' files with eval-score); --num-shards 0 takes
    them from RANK / WORLD_SIZE (and the GPU from LOCAL_RANK) under torchrun or deepspeed."""
    from ..data.errors import DataError
    from .mmbench import PromptConfig
    from .runner import EvalConfig, evaluate

    if not model or not data:
        return _error("--model and --data are required", 2)
    shard, num_shards = _shard_from_env(shard, num_shards)
    try:
        config = EvalConfig(mode=mode, circular=circular, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            prompt=PromptConfig(instruction=instruction, use_hint=hint, template=template),
                            on_error=on_error, shard=shard, num_shards=num_shards).validate()
        result = evaluate(_load(model, device), data, out, config, model_name=model, restart=restart)
    except DataError as e:
        return _error(str(e), 1)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e), 2)
    print(f"answered {result.rows_run} rows ({result.rows - result.rows_run} resumed); "
          f"predictions: {result.predictions}")
    if result.report is None:
        print(f"shard {shard} of {num_shards} done; score all shards with: mm-teamlora eval-score "
              f"--predictions <each shard's .tsv> --data {data} --out DIR")
    else:
        print(f"MMBench {mode}{' CircularEval' if circular else ''} {_summary(result.report)}; reports in {out}")
    return 0


def eval_score_command(predictions: list[str] | None = None, data: str = "", out: str = "runs/eval-score",
                       on_error: str = "raise") -> int:
    """Score existing predictions (TSV or JSONL; repeat --predictions to merge shards) against an MMBench TSV.

    No model is needed: letters are extracted again from each prediction. CircularEval is scored
    when the predictions hold rotated rows (index >= 1e6)."""
    from ..data.errors import DataError
    from .runner import rescore

    if not predictions or not data:
        return _error("--predictions and --data are required", 2)
    try:
        report = rescore(predictions, data, out, on_error=on_error)
    except DataError as e:
        return _error(str(e), 1)
    except (ValueError, FileNotFoundError, KeyError) as e:
        return _error(str(e), 2)
    print(f"MMBench {'CircularEval ' if report['circular_eval'] else ''}{_summary(report)}; reports in {out}")
    return 0


def inspect_routing_command(model: str = "", data: str = "", out: str = "runs/routing", template: str = "chat",
                            image_root: str = "", batch_size: int = 8, max_samples: int = 0, max_length: int = 0,
                            on_error: str = "raise", plots: bool = True, device: str = "") -> int:
    """Record expert routing by token group and category on a TSV or conversation JSON; write routing.json and heatmaps.

    The model needs routed adapters (moelora, hydralora, teamlora). Separation per layer: JS
    divergence of mean router distributions between groups, MI between expert and group."""
    from ..data.errors import DataError
    from .routing import inspect_routing

    if not model or not data:
        return _error("--model and --data are required", 2)
    try:
        result = inspect_routing(_load(model, device), data, out, template=template, image_root=image_root or None,
                                 batch_size=batch_size, on_error=on_error, max_samples=max_samples,
                                 max_length=max_length, plots=plots, model_name=model, progress=True)
    except DataError as e:
        return _error(str(e), 1)
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _error(str(e), 2)
    sep = result["separation"]
    js = sep["mean_headline_js_bits"]
    print(f"{result['samples']} samples, {result['tokens']['total']} tokens {result['tokens']['by_group']}; "
          f"mean over {len(result['layers'])} layers: JS {sep['headline']} "
          f"{'-' if js is None else f'{js:.4f}'} bits, MI soft {sep['mean_mi_soft_bits']:.4f} bits; "
          f"routing.json and {len(result.get('plots', []))} plots in {out}")
    return 0
