"""Training one run of the comparison in its folder: settings.json (a folder made with other settings
is refused), its binding stage when the comparison has one, resuming or restarting each stage,
sittings.json, and the training figures of a finished run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from ..files import atomic_write_text
from .config import CompareConfig, CompareError
from .plan import RunSpec, fingerprint

logger = logging.getLogger(__name__)


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_finished(train_dir: str) -> bool:
    """The run's final checkpoint exists and says the schedule ran to its end."""
    from ..train.checkpoint import latest, read_state

    folder = latest(train_dir)
    return bool(folder and read_state(folder).get("finished"))


def train_run(config: CompareConfig, spec: RunSpec) -> bool:
    """Train (or continue) one run, after its binding stage when the comparison has one; False when
    it had finished already (nothing trained)."""
    from ..train import RunConfig

    overrides = spec.overrides(config)
    binding = spec.binding_overrides(config) if config.binding_steps else None
    settings_path = os.path.join(spec.folder, "settings.json")
    settings = {"spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "folder"},
                "run": fingerprint(RunConfig.from_yaml(config.base_run, overrides)),
                "binding": fingerprint(RunConfig.from_yaml(config.base_run, binding)) if binding else None,
                "overrides": overrides[:-1]}
    saved = read_json(settings_path)
    if saved is not None and (saved["run"], saved.get("binding")) != (settings["run"], settings["binding"]):
        raise CompareError(f"{spec.folder} holds a run made with other settings (its settings.json differs from "
                           "this comparison's); use another out folder, or move that one aside")
    if is_finished(spec.train_dir):
        if saved is None:
            raise CompareError(f"{spec.train_dir} holds a finished run this comparison did not start (no "
                               "settings.json); use another out folder, or move it aside")
        logger.info("%s: finished already, not retrained", spec.name)
        return False
    os.makedirs(spec.folder, exist_ok=True)
    atomic_write_text(settings_path, json.dumps(settings, indent=1) + "\n")
    logger.info("== train %s (%s, r=%d, k=%d, alpha=%g, seed %d)", spec.name, spec.method, spec.r,
                spec.num_experts, spec.alpha, spec.seed)
    if binding and not is_finished(spec.binding_dir):
        _sitting(config, spec, "binding", binding, spec.binding_dir)
    _sitting(config, spec, "train", overrides, spec.train_dir)
    return True


def _sitting(config: CompareConfig, spec: RunSpec, stage: str, overrides: list[str], train_dir: str) -> None:
    """One launch of a stage of the run (binding | train), resuming from its checkpoints, recorded
    in sittings.json; raises CompareError unless the stage finished."""
    from ..train import RunConfig
    from ..train.checkpoint import checkpoints

    resume = "auto" if checkpoints(train_dir) else None
    overwrite = resume is None and os.path.isdir(train_dir)  # a start that saved nothing: again
    logger.info("%s: %s stage%s", spec.name, stage, ", resuming" if resume else "")
    start = time.perf_counter()
    if config.nproc > 1:
        from ..train.launch import launch

        code = launch(config.base_run, overrides, config.nproc, resume=resume, overwrite=overwrite)
    else:
        from ..train import train

        run = RunConfig.from_yaml(config.base_run, overrides)
        code = 0 if train(run, resume=resume, overwrite=overwrite).finished else 1
    seconds = time.perf_counter() - start
    sittings = read_json(os.path.join(spec.folder, "sittings.json"), [])
    earlier = [s for s in sittings if s.get("stage", "train") == stage]
    # the training loop's own time and tokens in this sitting (up to its last save), as run_state.json
    # has them: start-up (and the first run's tokenising of the mixture) does not count
    state = read_json(os.path.join(train_dir, "run_state.json"), {})
    saved = state.get("step") is not None and state.get("step") != (earlier[-1].get("step") if earlier else None)
    sittings.append({"stage": stage, "wall_seconds": round(seconds, 2), "exit_code": code, "resumed": bool(resume),
                     "step": state.get("step"), "train_seconds": state.get("sitting_seconds", 0.0) if saved else 0.0,
                     "tokens": state.get("sitting_tokens", 0) if saved else 0})
    atomic_write_text(os.path.join(spec.folder, "sittings.json"), json.dumps(sittings, indent=1) + "\n")
    if code != 0 or not is_finished(train_dir):
        raise CompareError(f"training {spec.name} ({stage} stage) exited with code {code} before its last step; its "
                           f"log is above, its run folder {train_dir} (a rerun continues it)")


def training_figures(spec: RunSpec) -> dict:
    """Steps, time, tokens/s and peak memory of a finished run (its main stage), and what its binding
    stage did (None without one), from its own files."""
    from ..train.checkpoint import latest, read_state
    from ..train.metrics import read_metrics

    state = read_state(latest(spec.train_dir))
    records = read_metrics(os.path.join(spec.train_dir, "metrics.jsonl"))
    peaks = [r["peak_mem_mb"] for r in records if r.get("peak_mem_mb") is not None]
    sittings = read_json(os.path.join(spec.folder, "sittings.json"), [])
    main = [s for s in sittings if s.get("stage", "train") == "train"]
    if state.get("run_seconds") is not None:  # every sitting up to the last save, killed ones too
        seconds, tokens = state["run_seconds"], state["run_tokens"]
    else:  # a run trained before checkpoints carried the sum: the sittings its launches recorded
        seconds, tokens = sum(s["train_seconds"] for s in main), sum(s["tokens"] for s in main)
    binding = None
    if latest(spec.binding_dir):
        from ..demo import binding_result

        binding = binding_result(spec.binding_dir)
        binding["wall_seconds"] = round(sum(s["wall_seconds"] for s in sittings if s.get("stage") == "binding"), 1)
    return {"steps": state["step"], "total_steps": state["total_steps"], "val_loss": state.get("val_loss"),
            "train_loss": state.get("train_loss"),
            "train_seconds": round(seconds, 1),  # the training loops' time, validation and saves included
            "wall_seconds": round(sum(s["wall_seconds"] for s in main), 1),  # recorded launches: start-up too
            "sittings": len(main),
            "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else None,  # all ranks
            "peak_mem_mb": max(peaks) if peaks else None, "binding": binding}
