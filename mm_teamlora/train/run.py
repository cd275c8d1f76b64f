"""`train(run)`: one training run, start to finish, on every rank of a DeepSpeed launch (or alone).

1. Check the run before any process group starts (files, ZeRO JSON, batch sizes, the run folder).
2. Build the model, add the adapters; build the mixture (rank 0 first, so the others hit its cache),
   hold out the validation records; plan the batches.
3. `deepspeed.initialize` with the run's groups and schedule; resume the engine, RNGs and sampler
   position from a checkpoint when asked.
4. Steps until `max_steps` (or `epochs`), `max_minutes` (rank 0 decides, every rank stops at the
   same step; with `fit_to_minutes` the schedule is first shortened to fit it) or a validation loss
   at or below `stop_at_val_loss` (reduced over ranks, so every rank decides the same); checkpoints
   every `save_steps` / `save_minutes` and at the end; validation every `eval_steps` and at the end;
   metrics every `log_steps`.

The run folder: run_config.yaml (resolved, overrides applied), data_report.json, metrics.jsonl,
tb/, loss_curve.png, checkpoint-*/ (see checkpoint.py), latest, run_state.json.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..adapters import trainable_parameter_report
from ..data import DataCollator, GroupedBatchSampler, MixtureConfig, build_dataset
from ..files import atomic_write_text
from . import checkpoint, feature_cache
from .config import RunConfig, RunConfigError
from .data import BatchStream, collate_with_names, split_validation
from .engine import build_model, deepspeed_config, device, group_names, init_distributed, initialize, model_config
from .loop import Timer, routing_usage, train_step, validate
from .metrics import MetricsLog, format_routing, plot_loss_curve

logger = logging.getLogger(__name__)
RUN_STATE, RUN_CONFIG = "run_state.json", "run_config.yaml"
KILL_AT_STEP = "MM_TEAMLORA_TEST_KILL_AT_STEP"  # tests: SIGKILL this process after that step
# optim.fit_to_minutes: steps measured before fitting (past the warm-up; also the refits' interval and
# the recent window they read), and the share of the time left that the fitted steps may fill
# (validations not yet seen in the measurement need the rest)
FIT_AFTER_STEPS, FIT_MARGIN = 10, 0.95


@dataclass
class RunResult:
    run_dir: str
    checkpoint: str  # the final checkpoint
    steps: int  # optimizer steps done (in all sittings)
    total_steps: int
    finished: bool  # the schedule ran to its end or stop_at_val_loss was reached (False: max_minutes stopped it)
    train_loss: float | None  # of the last logged step
    val_loss: float | None  # at the end
    tokens_per_s: float  # this sitting's, summed over ranks
    train_seconds: float  # this sitting's training time


def preflight(run: RunConfig, world_size: int, resume: str | None, overwrite: bool) -> None:
    """Everything that can be checked before a process group starts."""
    if not os.path.isfile(run.data):
        raise RunConfigError(f"run config: data: mixture {run.data} not found")
    MixtureConfig.from_yaml(run.data)
    model_config(run)
    deepspeed_config(run, world_size)
    if run.precision == "bf16" and not torch.cuda.is_available():
        logger.warning("precision bf16 on a CPU: bf16 matmul is far slower than fp32 on most CPUs (about 100x "
                       "here); use precision: fp32 unless this CPU has native bf16")
    if resume and resume != "auto" and not os.path.isfile(os.path.join(resume, checkpoint.STATE_FILE)):
        raise RunConfigError(f"--resume {resume}: not a complete checkpoint folder (no {checkpoint.STATE_FILE})")
    if not resume and not overwrite and checkpoint.checkpoints(run.output_dir):
        state = _run_state(run.output_dir)
        what = "a finished run" if state.get("finished") else "checkpoints of an unfinished run"
        raise RunConfigError(f"{run.output_dir} holds {what}; continue it with --resume auto, or start over "
                             "with --overwrite (which deletes it)")


def _run_state(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_STATE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _mixture(run: RunConfig) -> MixtureConfig:
    config = MixtureConfig.from_yaml(run.data)
    if run.stage == "pretrain_projector" and config.template != "plain":
        logger.info("stage pretrain_projector: template %r -> plain (the image, then the answer)", config.template)
        config.template = "plain"
    if config.tokenizer is not None:
        logger.info("the mixture's tokenizer %r is for `data check`; training uses the model's", config.tokenizer)
    return config


def train(run: RunConfig, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Run (or continue) the training run `run` on this process's rank; see the module doc."""
    preflight(run, int(os.environ.get("WORLD_SIZE", "1")), resume, overwrite)
    rank, world = init_distributed()
    run_dir = run.output_dir
    if rank == 0:
        if overwrite and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        os.makedirs(run_dir, exist_ok=True)
    torch.distributed.barrier()
    resume_from = checkpoint.latest(run_dir) if resume == "auto" else resume
    if resume == "auto" and resume_from is None:
        logger.info("--resume auto: no checkpoint in %s, starting afresh", run_dir)

    # a preset converts into this machine's cache on first use: one rank per machine builds it first
    first_on_machine = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first_on_machine:
        torch.distributed.barrier()
    model = build_model(run)
    if first_on_machine:
        torch.distributed.barrier()
    if rank == 0:
        atomic_write_text(os.path.join(run_dir, RUN_CONFIG), run.to_yaml())
        if run.stage == "finetune":
            logger.info("%s", trainable_parameter_report(model))
        logger.info("global batch %d = micro-batch %d x accumulation %d x %d rank(s)",
                    run.optim.global_batch_size(world), run.optim.micro_batch_size, run.optim.grad_accum, world)
    dataset = None
    for turn in (0, 1):  # rank 0 builds the tokenised cache; the others then read it
        if (rank == 0) == (turn == 0):
            dataset = build_dataset(_mixture(run), **model.data_inputs(),
                                    report_dir=run_dir if rank == 0 else None)
        torch.distributed.barrier()
    train_view, val_view = split_validation(dataset, run.val_samples, run.seed)
    source_names = [s.config.name for s in dataset.mixture.sources]
    collator = DataCollator.from_tokenizer(model.tokenizer)
    stream = BatchStream(train_view, collator, run.optim.micro_batch_size, rank, world, run.seed,
                         run.dataloader_workers)
    gas = run.optim.grad_accum
    total = run.optim.max_steps or math.floor(run.optim.epochs * stream.batches_per_epoch / gas)
    if total < 1:
        raise RunConfigError(f"run config: {len(train_view)} training samples give {stream.batches_per_epoch} "
                             f"micro-batches per rank per epoch, fewer than grad_accum={gas}")

    # fingerprinted before ZeRO-3 shards the tower; on every rank, which then all use it or none
    cache = feature_cache.from_run(run.feature_cache, model, dataset.image_processor,
                                   bool(dataset.image_counts.sum()), device(), log=rank == 0)
    _seed_everything(run.seed + rank)
    engine, optimizer, scheduler = initialize(model, run, world, total)
    engine.train()
    model.vision_on_every_batch = engine.zero_optimization_stage() == 3
    step, state = 0, {}
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        step = state["step"]
        stream.load_state_dict(state["sampler"])
        schedule = scheduler.lr_lambdas[0]
        if schedule.fitted:  # a length fitted to max_minutes comes back with the scheduler's state
            total = schedule.total
        else:  # otherwise this run's config decides, as before the checkpoint
            schedule.__init__(total, run.optim.warmup_ratio, run.optim.schedule, run.optim.min_lr_ratio)
        logger.info("resumed from %s at step %d of %d", resume_from, step, total)
    if state.get("finished"):
        logger.info("%s already finished (%d steps%s): nothing to train", run_dir, step,
                    ", stop_at_val_loss reached" if state.get("stopped_by") == "stop_at_val_loss" else "")
        return RunResult(run_dir, resume_from, step, total, True, state.get("train_loss"), state.get("val_loss"), 0.0, 0.0)

    log = MetricsLog(run_dir, run.tensorboard, resume_step=step) if rank == 0 else None
    names = group_names(optimizer)
    result = _steps(run, engine, stream, val_view, collator, source_names, log, names, step, total, rank, world,
                    state, cache, scheduler)
    if log is not None:
        log.close()
        plot_loss_curve(run_dir)
    return result


def _val_batches(view, collator, run: RunConfig, rank: int, world: int):
    sampler = GroupedBatchSampler.from_dataset(view, batch_size=run.optim.micro_batch_size, num_replicas=world,
                                               rank=rank, seed=run.seed)
    for indices in sampler.batches(0):
        yield collate_with_names(collator, [view[i] for i in indices])


def _steps(run: RunConfig, engine, stream: BatchStream, val_view, collator, source_names, log, group_names_,
           step: int, total: int, rank: int, world: int, state: dict, cache, scheduler) -> RunResult:
    gas, o = run.optim.grad_accum, run.optim
    # The first fit comes after the warm-up; in the sitting that made it, each save or validation after
    # it, and every FIT_AFTER_STEPS steps, may shorten the schedule again (never lengthen it): a save's
    # cost joins the seconds per step, and a machine that slows down (another job, throttling) shows
    # in the recent steps' pace before it shows in the sitting's mean.
    fitting = o.fit_to_minutes and not scheduler.lr_lambdas[0].fitted  # this sitting fits the schedule
    fit_pending, refit_due = fitting, False
    recent = collections.deque(maxlen=FIT_AFTER_STEPS)  # training seconds of the latest steps
    first_step, first_done = step, None
    kill_at = int(os.environ.get(KILL_AT_STEP, "0"))
    batches = iter(stream)
    started = last_save = time.perf_counter()
    window = {"tokens": 0, "seconds": 0.0}
    sitting_tokens, timer = 0, Timer()
    # the run's training time and tokens over every sitting up to each save: a sitting killed after
    # its last save leaves no record of its own, but the checkpoint it left carries the sum onwards
    # (None once a run resumes from a checkpoint made before this record existed)
    carried = (0.0, 0) if step == 0 else (state.get("run_seconds"), state.get("run_tokens"))
    train_loss, val_loss = state.get("train_loss"), state.get("val_loss")
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
    stopped = reached = False  # by max_minutes / by stop_at_val_loss
    cached = {"epoch": stream.position.epoch, "hits": 0, "misses": 0}
    while step < total and not stopped and not reached:
        micro = [next(batches) for _ in range(gas)]
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        logging_step = (step + 1) % run.log_steps == 0 or step + 1 == total
        stats, routing = train_step(engine, micro, source_names, world, record=logging_step, feature_cache=cache,
                                    all_logits=not run.supervised_logits)
        step += 1
        if rank == 0:
            now = time.perf_counter()
            elapsed = now - started
            first_done = first_done or now
            refit_due = refit_due or (fitting and not fit_pending and (step - first_step) % FIT_AFTER_STEPS == 0)
            fitted = _fitted_total(o, scheduler, step, total, elapsed, now - first_done, step - first_step - 1,
                                   recent) if fit_pending or refit_due else 0
            if refit_due and fitted > total - max(1, (total - step) // 50):
                fitted = 0  # refits only shorten, and not for a change within 2% of the steps left
            stats.flags = [float(o.max_minutes is not None and elapsed >= o.max_minutes * 60),
                           float(run.save_minutes is not None and now - last_save >= run.save_minutes * 60),
                           float(fitted)]
        stats = stats.reduce(len(source_names))
        stopped = bool(stats.flags[0])
        if stats.flags[2] > 0:
            fit_pending = False
            total = _fit_schedule(scheduler, int(stats.flags[2]), total, rank, bar)
        refit_due = False
        if cache is not None:
            _count_cache(cached, stats, micro[-1]["epoch"], step, rank)
        seconds = timer.lap()
        recent.append(seconds)
        window["tokens"] += stats.tokens
        window["seconds"] += seconds
        sitting_tokens += stats.tokens
        train_loss = stats.loss
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{lrs[0]:.2e}", tok_s=f"{stats.tokens / seconds:.0f}")
        if logging_step:
            record = _record(step, stream, stats, lrs, group_names_, engine, window, source_names)
            if cache is not None:
                record["feature_cache"] = {"hits": stats.cache_hits, "misses": stats.cache_misses}
            if routing is not None:
                record["routing"] = usage = routing_usage(routing)
                if rank == 0:
                    logger.info("step %d: %s", step, format_routing(usage))
            if log is not None:
                log.write(record)
            window = {"tokens": 0, "seconds": 0.0}
        last = step == total or stopped
        if val_view is not None and ((run.eval_steps and step % run.eval_steps == 0) or last):
            val_loss = _validate(run, engine, val_view, collator, source_names, log, step, rank, world, cache)
            refit_due = fitting and not fit_pending
            reached = run.stop_at_val_loss is not None and val_loss <= run.stop_at_val_loss
            if reached and rank == 0:
                logger.info("step %d: validation loss %.4f <= stop_at_val_loss %g: the run ends here", step,
                            val_loss, run.stop_at_val_loss)
        if last or reached or (run.save_steps and step % run.save_steps == 0) or stats.flags[1]:
            finished = step == total or reached
            stopped_by = "stop_at_val_loss" if reached else "max_minutes" if stopped and step < total else None
            sitting_seconds = round(time.perf_counter() - started, 2)
            run_totals = ({"run_seconds": None, "run_tokens": None} if carried[0] is None else
                          {"run_seconds": round(carried[0] + sitting_seconds, 2), "run_tokens": carried[1] + sitting_tokens})
            trainer_state = {"step": step, "total_steps": total, "planned_steps": scheduler.lr_lambdas[0].planned,
                             "finished": finished, "stopped_by": stopped_by,
                             "sampler": stream.state_dict(), "train_loss": train_loss, "val_loss": val_loss,
                             "seed": run.seed, "world_size": world, "sitting_seconds": sitting_seconds, **run_totals}
            folder = checkpoint.save(engine, engine.module, run.output_dir, step, trainer_state, run.save_total_limit)
            last_save = time.perf_counter()
            refit_due = fitting and not fit_pending
            if rank == 0:
                atomic_write_text(os.path.join(run.output_dir, RUN_STATE), json.dumps(
                    {"finished": finished, "stopped_by": stopped_by, "step": step, "total_steps": total,
                     "planned_steps": trainer_state["planned_steps"],
                     "checkpoint": os.path.basename(folder), "sitting_tokens": sitting_tokens,
                     "sitting_seconds": sitting_seconds, **run_totals}, indent=1) + "\n")
                bar.write(f"saved {folder}")
        if kill_at and step == kill_at:
            os.killpg(os.getpgid(0), 9)  # the whole launch: launcher and every rank
        timer.lap()  # validation and saving do not count as training time
    bar.close()
    train_seconds = time.perf_counter() - started
    if cache is not None and rank == 0:
        logger.info("vision feature cache: %d hits, %d misses in this sitting's %s (training images, all ranks)",
                    cached["hits"], cached["misses"], f"{step} steps" if step != 1 else "step")
    if stopped and step < total and not reached and rank == 0:
        logger.info("max_minutes=%g reached: stopped at step %d of %d (checkpoint saved); --resume auto continues",
                    o.max_minutes, step, total)
    return RunResult(run.output_dir, checkpoint.latest(run.output_dir), step, total, step == total or reached,
                     train_loss, val_loss, sitting_tokens / max(train_seconds, 1e-9), train_seconds)


def _fitted_total(o, scheduler, step: int, total: int, elapsed: float, measured: float, measured_steps: int,
                  recent: collections.deque) -> int:
    """Rank 0's fitted schedule length at this step (0: not measured enough yet): what is left of
    max_minutes over the seconds per step, the larger of this sitting's mean since its first step
    (saves and validations included) and the mean of its latest FIT_AFTER_STEPS training steps."""
    if measured_steps < FIT_AFTER_STEPS or step < scheduler.lr_lambdas[0].warmup or measured <= 0:
        return 0
    pace = max(measured / measured_steps, sum(recent) / len(recent) if len(recent) == recent.maxlen else 0.0)
    steps_left = math.floor((o.max_minutes * 60 - elapsed) / pace * FIT_MARGIN)
    return max(step + 1, min(total, step + steps_left))


def _fit_schedule(scheduler, fitted: int, total: int, rank: int, bar) -> int:
    """Shorten the schedule to `fitted` steps on every rank (the lr of the next step included)."""
    schedule = scheduler.lr_lambdas[0]
    if fitted >= total:
        if rank == 0:
            logger.info("fit_to_minutes: the planned %d steps fit in max_minutes; the schedule is unchanged", total)
        return total
    was = schedule.total
    schedule.fit(fitted)
    factor = schedule(scheduler.last_epoch)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    if rank == 0:
        bar.total = fitted
        bar.refresh()
        logger.info("fit_to_minutes: the schedule now ends at step %d (%s %d): what fits in max_minutes at "
                    "this sitting's speed", fitted, "planned" if was == schedule.planned else "was", was)
    return fitted


def _count_cache(counts: dict, stats, epoch: int, step: int, rank: int) -> None:
    """Sum the cache's hits and misses over ranks; rank 0 logs the sums so far at the first step
    that reaches a new epoch (a step may hold micro-batches of two)."""
    counts["hits"] += stats.cache_hits
    counts["misses"] += stats.cache_misses
    if epoch != counts["epoch"]:
        counts["epoch"] = epoch
        if rank == 0:
            logger.info("vision feature cache: %d hits, %d misses so far (step %d, into epoch %d; training images, "
                        "all ranks)", counts["hits"], counts["misses"], step, epoch)


def _record(step, stream, stats, lrs, names, engine, window, source_names) -> dict:
    norm = engine.get_global_grad_norm()
    by_source = {n: stats.source_loss[i] / stats.source_tokens[i] for i, n in enumerate(source_names)
                 if stats.source_tokens[i]}
    return {"step": step, "epoch": stream.position.epoch, "loss": stats.loss, "aux_loss": stats.aux_loss,
            "lr": dict(zip(names, lrs)), "grad_norm": None if norm is None else float(norm),
            "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9), "supervised_tokens": stats.supervised,
            "tokens_by_group": {"image": stats.group_tokens[0], "text_with_image": stats.group_tokens[1],
                                "text_only": stats.group_tokens[2]},
            "loss_by_source": by_source, "peak_mem_mb": _peak_memory_mb()}


def _validate(run, engine, view, collator, source_names, log, step, rank, world, cache=None) -> float:
    stats = validate(engine, _val_batches(view, collator, run, rank, world), source_names,
                     feature_cache=cache, all_logits=not run.supervised_logits).reduce(len(source_names))
    by_source = {n: stats.source_loss[i] / stats.source_tokens[i] for i, n in enumerate(source_names)
                 if stats.source_tokens[i]}
    if log is not None:
        log.write({"step": step, "split": "val", "val_loss": stats.loss, "val_loss_by_source": by_source,
                   "val_supervised_tokens": stats.supervised})
        logger.info("step %d: validation loss %.4f over %d supervised tokens", step, stats.loss, stats.supervised)
    return stats.loss
