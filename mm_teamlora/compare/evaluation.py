"""Phases 2 and 4, scoring trained runs: the alpha grid's answer-token loss on the validation TSV, and
the final evaluation (likelihood, CircularEval) with the routing report and the expert-masking test;
each cached per checkpoint."""

from __future__ import annotations

import json
import logging
import os

from ..files import atomic_write_text
from .config import ROUTED, CompareConfig, CompareError
from .plan import RunSpec
from .runs import read_json

logger = logging.getLogger(__name__)


def _checkpoint_stamp(checkpoint: str) -> dict:
    from ..train.checkpoint import STATE_FILE

    return {"checkpoint": os.path.abspath(checkpoint),
            "mtime": os.path.getmtime(os.path.join(checkpoint, STATE_FILE))}


def _evaluate(model, data: str, out_dir: str, limit: int, circular: bool, name: str):
    from ..eval import EvalConfig, evaluate

    config = EvalConfig(mode="likelihood", circular=circular, limit=limit)
    try:
        return evaluate(model, data, out_dir, config, model_name=name)
    except ValueError as e:
        if "other settings" not in str(e):
            raise
        logger.info("%s: predictions of another checkpoint or settings: evaluating afresh", out_dir)
        return evaluate(model, data, out_dir, config, model_name=name, restart=True)


def answer_loss(log_path: str, data: str) -> tuple[float, int]:
    """Mean -log p(the right option's letter) over the questions of a likelihood predictions log,
    and how many questions it averages."""
    from ..eval import read_mmbench

    answers = {q.index: q.answer for q in read_mmbench(data).asked(False) if q.answer}
    losses = []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if record.get("index") in answers and record.get("scores"):
                losses.append(-record["scores"][answers[record["index"]]])
    if not losses:
        raise CompareError(f"{log_path}: no scored validation question")
    return sum(losses) / len(losses), len(losses)


def score_on_val(config: CompareConfig, spec: RunSpec) -> dict:
    """The grid score of a trained run: answer-token loss on the validation TSV (cached)."""
    from ..model import MultimodalLM
    from ..train.checkpoint import latest

    saved = saved_val_score(config, spec)
    if saved is not None:
        return saved
    checkpoint = latest(spec.train_dir)
    logger.info("== val %s on %s", spec.name, config.val_path)
    result = _evaluate(MultimodalLM.from_pretrained(checkpoint), config.val_path, os.path.join(spec.folder, "val"),
                       config.val_limit, False, checkpoint)
    loss, n = answer_loss(result.log, config.val_path)
    out = {"stamp": _val_stamp(config, checkpoint), "answer_loss": loss, "questions": n,
           "vanilla": result.report["overall"]["vanilla"]}
    atomic_write_text(os.path.join(spec.folder, "val_score.json"), json.dumps(out, indent=1) + "\n")
    return out


def _val_stamp(config: CompareConfig, checkpoint: str) -> dict:
    return {**_checkpoint_stamp(checkpoint), "data": os.path.abspath(config.val_path), "limit": config.val_limit}


def saved_val_score(config: CompareConfig, spec: RunSpec) -> dict | None:
    """The run's grid score in val_score.json when it was made from its final checkpoint with these
    validation settings (None otherwise: not scored yet, or scored from another checkpoint)."""
    from ..train.checkpoint import latest

    checkpoint = latest(spec.train_dir)
    saved = read_json(os.path.join(spec.folder, "val_score.json"))
    return saved if checkpoint and saved and saved.get("stamp") == _val_stamp(config, checkpoint) else None


def evaluate_run(config: CompareConfig, spec: RunSpec) -> dict:
    """The eval report (and routing summary for routed methods) of a trained run (cached)."""
    from ..model import MultimodalLM
    from ..train.checkpoint import latest

    checkpoint = latest(spec.train_dir)
    routed = spec.method in ROUTED
    eval_dir, routing_dir = os.path.join(spec.folder, "eval"), os.path.join(spec.folder, "routing")
    if is_evaluated(config, spec):
        routing = read_json(os.path.join(routing_dir, "routing.json")) if routed else None
        if routed:
            routing["ablation"] = masking_test(config, spec, checkpoint, routing)
        return {"report": read_json(os.path.join(eval_dir, "report.json")), "routing": routing}
    logger.info("== eval %s on %s", spec.name, config.eval_path)
    model = MultimodalLM.from_pretrained(checkpoint)
    report = _evaluate(model, config.eval_path, eval_dir, config.eval_limit, True, checkpoint).report
    routing = None
    if routed:
        from ..eval import inspect_routing

        routing = inspect_routing(model, config.eval_path, routing_dir, max_samples=_routing_samples(config),
                                  plots=False, model_name=checkpoint)
    atomic_write_text(os.path.join(spec.folder, "eval_done.json"),
                      json.dumps({"stamp": _eval_stamp(config, spec, checkpoint)}, indent=1) + "\n")
    if routed:
        routing["ablation"] = masking_test(config, spec, checkpoint, routing, model)
    return {"report": report, "routing": routing}


def _eval_stamp(config: CompareConfig, spec: RunSpec, checkpoint: str) -> dict:
    return {**_checkpoint_stamp(checkpoint), "data": os.path.abspath(config.eval_path), "limit": config.eval_limit,
            "routing_samples": config.routing_samples if spec.method in ROUTED else None}


def is_evaluated(config: CompareConfig, spec: RunSpec) -> bool:
    """The run's eval report (eval_done.json) was made from its final checkpoint with these eval settings."""
    from ..train.checkpoint import latest

    checkpoint = latest(spec.train_dir)
    saved = read_json(os.path.join(spec.folder, "eval_done.json"))
    return bool(checkpoint and saved and saved.get("stamp") == _eval_stamp(config, spec, checkpoint)
                and os.path.isfile(os.path.join(spec.folder, "eval", "report.json")))


def _routing_samples(config: CompareConfig) -> int:
    """Questions the routing report and the masking test read: `routing_samples`, else the eval's."""
    return config.routing_samples or config.eval_limit


def masking_test(config: CompareConfig, spec: RunSpec, checkpoint: str, routing: dict, model=None) -> dict:
    """The causal test of the visual / textual split (`eval.ablation`: `masking_experts` experts
    masked per layer, image-preferred / text-preferred / random, the random control drawn
    `masking_draws` times from `masking_seed` on) on the routing report's questions, with the masks
    chosen from that report; cached in routing/ablation.json per checkpoint, data, sample count and
    those three settings (the model is loaded only when it must run)."""
    from ..eval.ablation import ablate
    from ..eval.routing import load_samples

    samples = _routing_samples(config)
    stamp = {**_checkpoint_stamp(checkpoint), "data": os.path.abspath(config.eval_path), "samples": samples,
             "experts": config.masking_experts, "seed": config.masking_seed, "draws": config.masking_draws}
    path = os.path.join(spec.folder, "routing", "ablation.json")
    saved = read_json(path)
    if saved and saved.get("stamp") == stamp:
        return saved["result"]
    logger.info("== expert masking %s on %s", spec.name, config.eval_path)
    if model is None:
        from ..model import MultimodalLM

        model = MultimodalLM.from_pretrained(checkpoint)
    _, _, answers = load_samples(model, config.eval_path, max_samples=samples, with_answers=True)
    try:
        result = ablate(model, answers, routing["layers"], config.masking_experts, config.masking_seed,
                        random_draws=config.masking_draws)
    except ValueError as e:  # e.g. questions without pictures only: said in the report, not fatal
        logger.warning("%s: no expert-masking test: %s", spec.name, e)
        result = {"not_run": str(e)}
    atomic_write_text(path, json.dumps({"stamp": stamp, "result": result}, indent=1) + "\n")
    return result
