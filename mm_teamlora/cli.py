"""`mm-teamlora`: one entry point; each subcommand is a plain typed function.

A function's parameters become its options: a parameter without a default is positional, one with a
default is `--name` (underscores become dashes), `bool` defaults become `--flag / --no-flag`, and the
first line of the docstring is the help. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from typing import Callable


def demo(steps: int = 150, out: str = "runs/adapter-demo", seed: int = 0, default_model: bool = True) -> None:
    """Train LoRA and TeamLoRA side by side on a tiny model, then ask the embedded default model."""
    from .adapter_demo import run_adapter_demo

    run_adapter_demo(steps=steps, out=out, seed=seed)
    if default_model:
        from .eval.chat import answer
        from .model import load_model

        print("\nThe embedded default (SmolLM2-135M-Instruct + DINOv2 ViT-S/14, real pretrained weights, "
              "projector untrained):")
        model = load_model("smollm2-dinov2-small")
        for question in ("What is the capital of France?", "Name three primary colours."):
            print(f"  Q: {question}\n  A: {answer(model, question, max_new_tokens=40)}")


def data_check(config: str, out: str = "", tokenizer: str = "", image_token_count: int = 0, rebuild: bool = False,
               full_decode: bool = False) -> int:
    """Run a data mixture through the whole pipeline without training; print counts by source and reason.

    Exits 1 when a record fails under `on_error: raise` (or the mixture is empty), 2 on a bad config."""
    from .data.check import check_mixture

    return check_mixture(config, out=out or None, tokenizer=tokenizer or None,
                         image_token_count=image_token_count or None, rebuild=rebuild, full_decode=full_decode)


def chat(question: str, model: str = "smollm2-dinov2-small", image: list[str] | None = None, max_new_tokens: int = 128,
         temperature: float = 0.0) -> int:
    """Answer a question, optionally about images (--image PATH, repeatable), and print the answer."""
    from .eval.chat import answer
    from .model import load_model

    try:
        print(answer(load_model(model), question, image or [], max_new_tokens=max_new_tokens, temperature=temperature))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def data_demo(out: str = "runs/demo-data", seed: int = 0, train_size: int = 0, eval_size: int = 0,
              wordnet_dir: str = "", eval_text_only: bool = True) -> int:
    """Build demo data from installed assets: a LLaVA training mix, a disjoint MMBench eval TSV, demo.yaml.

    Assets: `pip install easy-vqa scikit-learn scikit-image` and `apt-get install -y wordnet-base`.
    --train-size/--eval-size 0: the defaults (3000 / 300). Exits 2 when an asset is missing,
    1 when the written eval set overlaps the training set."""
    from .data.demo import demo_data_command

    return demo_data_command(out, seed=seed, train_size=train_size or None, eval_size=eval_size or None,
                             wordnet_dir=wordnet_dir or None, eval_text_only=eval_text_only)


def eval_(model: str = "", data: str = "", mode: str = "likelihood", circular: bool = False, out: str = "runs/eval",
          batch_size: int = 8, template: str = "chat", max_new_tokens: int = 32,
          instruction: str = "Answer with the option's letter from the given choices directly.", hint: bool = True,
          shard: int = 0, num_shards: int = 1, on_error: str = "raise", restart: bool = False, device: str = "") -> int:
    """Evaluate a model on an MMBench TSV (likelihood or generate, optional CircularEval) and write the reports.

    Writes predictions.tsv, predictions.jsonl (the resume log), report.json and report.md into --out. A rerun with
    the same settings resumes; --shard K --num-shards N runs one shard (merge with eval-score); --num-shards 0 takes
    them from RANK / WORLD_SIZE under torchrun or deepspeed."""
    from .eval.commands import eval_command

    return eval_command(model=model, data=data, mode=mode, circular=circular, out=out, batch_size=batch_size,
                        template=template, max_new_tokens=max_new_tokens, instruction=instruction, hint=hint,
                        shard=shard, num_shards=num_shards, on_error=on_error, restart=restart, device=device)


def eval_score(predictions: list[str] | None = None, data: str = "", out: str = "runs/eval-score",
               on_error: str = "raise") -> int:
    """Score existing predictions (TSV or JSONL; repeat --predictions to merge shards) against an MMBench TSV, no model."""
    from .eval.commands import eval_score_command

    return eval_score_command(predictions=predictions, data=data, out=out, on_error=on_error)


def inspect_routing(model: str = "", data: str = "", out: str = "runs/routing", template: str = "chat",
                    image_root: str = "", batch_size: int = 8, max_samples: int = 0, max_length: int = 0,
                    on_error: str = "raise", plots: bool = True, device: str = "") -> int:
    """Record expert routing by token group and category (TSV or conversation JSON); write routing.json and heatmaps."""
    from .eval.commands import inspect_routing_command

    return inspect_routing_command(model=model, data=data, out=out, template=template, image_root=image_root,
                                   batch_size=batch_size, max_samples=max_samples, max_length=max_length,
                                   on_error=on_error, plots=plots, device=device)


# a command is a typed function, or a group of them (`mm-teamlora data check ...`)
COMMANDS: dict[str, Callable | dict[str, Callable]] = {
    "demo": demo, "chat": chat, "data": {"check": data_check, "demo": data_demo},
    "eval": eval_, "eval-score": eval_score, "inspect-routing": inspect_routing,
}


def _annotation(fn: Callable, name: str):
    hint = typing.get_type_hints(fn).get(name, str)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_command(subparsers, name: str, fn: Callable | dict) -> None:
    if isinstance(fn, dict):
        group = subparsers.add_parser(name, help=f"{name} commands: {', '.join(fn)}")
        children = group.add_subparsers(required=True, metavar="COMMAND")
        for child_name, child in fn.items():
            _add_command(children, child_name, child)
        return
    doc = inspect.getdoc(fn) or ""
    parser = subparsers.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, param in inspect.signature(fn).parameters.items():
        kind = _annotation(fn, name)
        flag = "--" + name.replace("_", "-")
        if param.default is inspect.Parameter.empty:
            parser.add_argument(name, type=kind)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default)
        elif typing.get_origin(kind) is list:  # repeatable option
            parser.add_argument(flag, dest=name, type=typing.get_args(kind)[0], action="append", default=param.default)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=param.default,
                                help=f"default: {param.default}")
    parser.set_defaults(_command=fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm-teamlora", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        _add_command(subparsers, name, fn)
    args = vars(parser.parse_args(argv))
    command = args.pop("_command")
    return command(**args) or 0


if __name__ == "__main__":
    sys.exit(main())
