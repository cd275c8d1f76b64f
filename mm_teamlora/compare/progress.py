"""How far a comparison has got, read from its folder alone (`mm-teamlora compare --status`): every
run it will train, in training order, with the stage and step each has reached, the grid's scores
and choices so far, which runs are evaluated, and the training time left at the finished runs'
pace. Nothing trains, nothing is evaluated, and the eval TSV is not read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import CompareConfig, CompareError
from .evaluation import is_evaluated, saved_val_score
from .plan import RunSpec, choose_multiplier, grid_runs, later_runs, saved_plan
from .runs import is_finished, read_json

WAITING = "waits for the grid"


@dataclass
class RunProgress:
    name: str  # its folder under runs/; "<label>-a?-s<seed>" while the grid has not chosen its multiplier
    kind: str  # grid | main | ablation (a grid run at the chosen multiplier is also its method's first main run)
    state: str  # finished | training | binding | not started | waits for the grid
    step: int | None = None  # optimizer steps done in its current stage (None: not started)
    total: int | None = None  # that stage's steps (the binding stage's: its cap)
    val_loss: float | None = None  # grid runs: answer loss on the validation TSV, once scored
    evaluated: bool = False  # on the eval TSV, from its final checkpoint
    wall_seconds: float = 0.0  # of its sittings so far


@dataclass
class CompareProgress:
    out: str
    plan: str  # "ok" | "missing" (nothing started) | "other" (plan.json made for another config)
    runs: list[RunProgress] = field(default_factory=list)
    chosen: dict[str, float] = field(default_factory=dict)  # the grid's multiplier of each method it has chosen

    @property
    def finished(self) -> int:
        return sum(r.state == "finished" for r in self.runs)

    @property
    def seconds_per_run(self) -> float | None:
        """The finished runs' mean wall time (None before one has finished)."""
        done = [r.wall_seconds for r in self.runs if r.state == "finished" and r.wall_seconds > 0]
        return sum(done) / len(done) if done else None

    @property
    def training_seconds_left(self) -> float | None:
        """The unfinished runs at the finished runs' mean wall time (None before one has finished)."""
        per_run = self.seconds_per_run
        return (len(self.runs) - self.finished) * per_run if per_run is not None else None


def compare_progress(config: CompareConfig) -> CompareProgress:
    """See the module doc."""
    the_plan = saved_plan(config)
    if the_plan is None:
        exists = os.path.isfile(os.path.join(config.out, "plan.json"))
        return CompareProgress(config.out, "other" if exists else "missing")
    progress = CompareProgress(config.out, "ok")
    seen: dict[str, RunProgress] = {}
    for method, specs in grid_runs(config, the_plan).items():
        scores = []
        for spec in specs:
            seen[spec.name] = row = _run_progress(config, spec)
            score = saved_val_score(config, spec) if row.state == "finished" else None
            if score is not None:
                row.val_loss = score["answer_loss"]
                scores.append({"multiplier": spec.multiplier, "answer_loss": score["answer_loss"]})
        if len(scores) == len(specs):
            progress.chosen[method] = choose_multiplier(scores)["multiplier"]
    known = {m: progress.chosen.get(m, 1.0) for m in config.methods}
    main, ablations = later_runs(config, the_plan, known)
    for spec in [*main, *ablations]:
        source = the_plan["entries"][spec.label]["method"]
        if config.alpha_grid and source in config.methods and source not in progress.chosen:
            if spec.kind == "main" and spec.seed == config.seeds[0]:
                continue  # one of its method's grid runs, listed above
            seen[f"{spec.label}-a?-s{spec.seed}"] = RunProgress(f"{spec.label}-a?-s{spec.seed}", spec.kind, WAITING)
        elif spec.name in seen:
            seen[spec.name].kind = f"{seen[spec.name].kind}, {spec.kind}"
        else:
            seen[spec.name] = _run_progress(config, spec)
        if spec.name in seen and seen[spec.name].state == "finished":
            seen[spec.name].evaluated = is_evaluated(config, spec)
    progress.runs = list(seen.values())
    return progress


def _run_progress(config: CompareConfig, spec: RunSpec) -> RunProgress:
    sittings = read_json(os.path.join(spec.folder, "sittings.json"), [])
    row = RunProgress(spec.name, spec.kind, "not started", wall_seconds=sum(s["wall_seconds"] for s in sittings))
    if is_finished(spec.train_dir):
        row.state = "finished"
        row.step, row.total = _stage_steps(spec.train_dir)
    elif os.path.isdir(spec.train_dir):
        row.state = "training"
        row.step, row.total = _stage_steps(spec.train_dir)
    elif os.path.isdir(spec.binding_dir):
        row.state = "binding"
        row.step, row.total = _stage_steps(spec.binding_dir)
    return row


def _stage_steps(stage_dir: str) -> tuple[int, int | None]:
    """A stage's steps done (its latest checkpoint, or its metrics log when that is further on: the
    binding stage saves only at its end) and its planned steps (its run config's optim.max_steps)."""
    from ..files import read_yaml
    from ..train.checkpoint import latest, read_state
    from ..train.metrics import read_metrics

    folder = latest(stage_dir)
    state = read_state(folder) if folder else {}
    logged = [r["step"] for r in read_metrics(os.path.join(stage_dir, "metrics.jsonl")) if "step" in r]
    config_path = os.path.join(stage_dir, "run_config.yaml")
    planned = read_yaml(config_path, "a run config", CompareError)["optim"]["max_steps"] \
        if os.path.isfile(config_path) else None
    return max([state.get("step", 0), *logged]), state.get("total_steps") if state.get("finished") else planned


def format_progress(progress: CompareProgress, config_path: str = "COMPARE.yaml") -> str:
    """What `mm-teamlora compare --status` prints."""
    if progress.plan == "missing":
        return f"nothing started in {progress.out}: `mm-teamlora compare {config_path}` starts it"
    if progress.plan == "other":
        return (f"{progress.out}/plan.json was made for another comparison config (base run, methods, ablations or "
                "alpha policy): this config's comparison has not started there")
    runs = progress.runs
    evaluated = sum(r.evaluated for r in runs)
    lines = [f"comparison in {progress.out}: {progress.finished} of {len(runs)} runs trained, {evaluated} evaluated "
             "(it evaluates once every run has trained, reusing what was evaluated from the same checkpoint)"]
    width = max([24, *(len(r.name) for r in runs)])  # an ablation's name can outgrow the usual column
    lines.append(f"  {'run':{width}} {'kind':16} {'state':20} {'steps':>9} {'val loss':>9} {'minutes':>8}  evaluated")
    for r in runs:
        steps = f"{r.step}/{r.total or '?'}" if r.step is not None else "-"
        loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        minutes = f"{r.wall_seconds / 60:.1f}" if r.wall_seconds else "-"
        lines.append(f"  {r.name:{width}} {r.kind:16} {r.state:20} {steps:>9} {loss:>9} {minutes:>8}  "
                     f"{'yes' if r.evaluated else '-'}")
    if progress.chosen:
        lines.append("alpha grid chose: " + ", ".join(f"{m} x{a:g}" for m, a in progress.chosen.items()))
    left = progress.training_seconds_left
    if left is not None and progress.finished < len(runs):
        lines.append(f"about {left / 3600:.1f} h of training left: {len(runs) - progress.finished} run(s) at the "
                     f"finished runs' {progress.seconds_per_run / 60:.0f} min each (evaluation not counted)")
    return "\n".join(lines)
