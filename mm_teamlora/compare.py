"""`mm-teamlora compare COMPARE.yaml`: TeamLoRA against LoRA, MoELoRA and HydraLoRA at matched
trainable parameters, the same optimizer steps and the same seeds, on one mixture (issue 17).

The base run (a run YAML, e.g. data_configs/runs/demo_teamlora.yaml) is the reference: its adapter's
method, rank and experts set the trainable-parameter count every other method is matched to.
Phases (each run skipped when its output is already there; see "Resuming"):
1. plan: the layer shapes of the base model give each method the rank whose adapter count is
   closest to the reference's (`adapters.matching`); every configuration is then built with the
   very `train.engine.build_model` training uses and its trainable parameters counted (plan.json);
   each method's alpha gives it the reference's update gain at uniform routing (TEAMLORA.md 4b),
   times the alpha-grid multiplier chosen in phase 2 (`alpha_policy: same` keeps the base alpha);
2. alpha grid (when `alpha_grid` is given): each method at each multiplier, at the first seed,
   scored by the answer-token loss (mean -log p of the right option's letter, likelihood) on the
   validation TSV carved from the training side; the lowest loss wins (never the eval TSV);
3. training: every method x seed, then the ablations at the first seed, through the same code as
   `mm-teamlora train --nproc N` (`train.launch`; in this process when nproc is 1). Each run gets
   `seed=S` (data order, dropout, and the adapter's initialisation through `adapter.seed`) and
   `optim.max_minutes=null`: the same optimizer steps (the base run's schedule) for everyone,
   never a time budget;
4. evaluation, only once every run has trained: every run's final checkpoint on the eval TSV
   (likelihood, CircularEval), and the routing report (JS divergence and mutual information of
   router probabilities between image and text tokens) of the routed methods;
5. reports: compare.json, compare.md and compare.png in `out` (vanilla and circular accuracy
   mean +- std over seeds with chance, per category, trainable parameters, tokens/s and training
   time as ratios to LoRA, peak memory, routing separation, grid and ablations; whether
   differences lie inside the seed spread is said for each).

Layout: OUT/compare_config.yaml, OUT/plan.json, OUT/runs/<label>-a<multiplier>-s<seed>/
{settings.json, sittings.json, train/, eval/, routing/, val/} (a grid run at the chosen multiplier
is the main run of its method's first seed: the same folder, trained once), OUT/compare.json,
OUT/compare.md, OUT/compare.png.

Resuming: a run whose final checkpoint says `finished` is never trained again; one with
checkpoints continues with `--resume auto`; a folder without any restarts (`--overwrite`). An
evaluation whose report was made from the same checkpoint, data and limit is reused. A run folder
made with other settings (its resolved run config differs) is an error: nothing is overwritten.

Ablations (`ablations:`, each one run at the first seed, compared with the main TeamLoRA run of
that seed): `no_competition` (TeamLoRA without M), `group_routing_off` / `group_routing_on`
(whichever differs from the base run), `k2`, `k8` (TeamLoRA with 2 / 8 experts at the same total
rank, alpha for the same gain), `moelora_loop` (MoELoRA in its published one-matmul-per-expert
form beside the fused one: how much of TeamLoRA's speed is the fusion).

Not yet done (issue 17): the causal masking test (mask the experts image tokens prefer, measure the
answer loss on image and text-only questions against a random-mask control;
`inspect-routing --ablate`). The recipe logs its progress; the CLI prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from .files import atomic_write_text, read_yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("lora", "moelora", "hydralora", "teamlora")
ROUTED = ("moelora", "hydralora", "teamlora")
ABLATIONS = ("no_competition", "group_routing_off", "group_routing_on", "k2", "k8", "moelora_loop")
ALPHA_POLICIES = ("gain", "same")
PATH_KEYS = ("base_run", "eval_data", "val_data", "demo_data")
PLAN_VERSION = 1
logger = logging.getLogger(__name__)


class CompareError(RuntimeError):
    """A phase of the comparison failed; the message says which run and where its files are."""


class CompareConfigError(ValueError):
    """A comparison config that cannot run; raised before anything trains."""


def _fail(where: str, message: str):
    raise CompareConfigError(f"compare config: {where}: {message}")


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(where, f"must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class CompareConfig:
    """One comparison as one YAML file (see the module doc); input paths resolve against the
    file's folder, `out` against the working directory."""

    base_run: str = os.path.join(REPO_ROOT, "data_configs", "runs", "demo_teamlora.yaml")
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_data: str = ""  # the eval TSV (MMBench), read only in the final evaluation
    val_data: str = ""  # the validation TSV the alpha grid is scored on (needed with alpha_grid)
    demo_data: str = ""  # a `data demo` folder, built when missing ("": the data exist already)
    eval_limit: int = 0  # the first N eval questions, every rotation (0: all)
    val_limit: int = 0  # the first N validation questions for the grid (0: all)
    nproc: int = 2  # ranks of each training launch (1: in this process)
    out: str = "runs/compare"
    alpha_policy: str = "gain"  # gain: each method's alpha gives the reference's update gain; same: base alpha
    alpha_grid: list[float] = field(default_factory=list)  # multipliers of that alpha ([]: no grid, 1 each)
    ablations: list[str] = field(default_factory=list)
    routing_samples: int = 64  # eval questions recorded for the routing separation (0: as many as evaluated)
    run_overrides: list[str] = field(default_factory=list)  # dotted KEY=VALUE, applied to every run

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "CompareConfig":
        if not isinstance(self.base_run, str) or not self.base_run:
            _fail("base_run", f"must name a run YAML, got {self.base_run!r}")
        if not isinstance(self.methods, list) or not self.methods:
            _fail("methods", f"must be a non-empty list of {', '.join(METHODS)}, got {self.methods!r}")
        for m in self.methods:
            if m not in METHODS:
                _fail("methods", f"{m!r} is not one of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            _fail("methods", f"names a method twice: {self.methods}")
        if not isinstance(self.seeds, list) or not self.seeds:
            _fail("seeds", f"must be a non-empty list of integers, got {self.seeds!r}")
        self.seeds = [_int("seeds", s, 0) for s in self.seeds]
        if len(set(self.seeds)) != len(self.seeds):
            _fail("seeds", f"names a seed twice: {self.seeds}")
        for key in ("eval_data", "val_data", "demo_data", "out"):
            if not isinstance(getattr(self, key), str):
                _fail(key, f"must be a path, got {getattr(self, key)!r}")
        if not self.out:
            _fail("out", "must name a folder")
        self.eval_limit = _int("eval_limit", self.eval_limit, 0)
        self.val_limit = _int("val_limit", self.val_limit, 0)
        self.nproc = _int("nproc", self.nproc, 1)
        self.routing_samples = _int("routing_samples", self.routing_samples, 0)
        if self.alpha_policy not in ALPHA_POLICIES:
            _fail("alpha_policy", f"must be one of {', '.join(ALPHA_POLICIES)}, got {self.alpha_policy!r}")
        if not isinstance(self.alpha_grid, list):
            _fail("alpha_grid", f"must be a list of positive multipliers, got {self.alpha_grid!r}")
        for a in self.alpha_grid:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
                _fail("alpha_grid", f"multipliers must be positive numbers, got {a!r}")
        self.alpha_grid = [float(a) for a in self.alpha_grid]
        if len(set(self.alpha_grid)) != len(self.alpha_grid):
            _fail("alpha_grid", f"names a multiplier twice: {self.alpha_grid}")
        if self.alpha_grid and not self.val_data and not self.demo_data:
            _fail("alpha_grid", "is scored on the validation TSV: give val_data (or demo_data)")
        if not isinstance(self.ablations, list):
            _fail("ablations", f"must be a list of {', '.join(ABLATIONS)}, got {self.ablations!r}")
        for a in self.ablations:
            if a not in ABLATIONS:
                _fail("ablations", f"{a!r} is not one of {', '.join(ABLATIONS)}")
        if "moelora_loop" in self.ablations and "moelora" not in self.methods:
            _fail("ablations", "moelora_loop is timed beside the fused moelora run: add moelora to methods")
        if not isinstance(self.run_overrides, list) or not all(isinstance(o, str) and "=" in o
                                                               for o in self.run_overrides):
            _fail("run_overrides", f"must be a list of KEY=VALUE strings, got {self.run_overrides!r}")
        for o in self.run_overrides:
            key = o.partition("=")[0]
            if key in ("seed", "output_dir", "optim.max_minutes") or key.startswith("adapter."):
                _fail("run_overrides", f"{key} is set by the comparison itself (seeds, folders, steps, adapters); "
                                       "change the base run or the comparison's own keys instead")
        if not self.eval_data and not self.demo_data:
            _fail("eval_data", "give the eval TSV (or demo_data, whose eval.tsv is used)")
        return self

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, base_dir: str | None = None, overrides: list[str] = ()) -> "CompareConfig":
        from .train.config import RunConfigError, apply_overrides

        try:
            data = apply_overrides(data or {}, [_absolute(o) for o in overrides])
        except RunConfigError as e:
            raise CompareConfigError(str(e).replace("run config", "compare config")) from None
        if not isinstance(data, dict):
            _fail("top level", f"expected a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            _fail("top level", f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        if base_dir is not None:
            for key in PATH_KEYS:
                if isinstance(data.get(key), str) and data[key]:
                    data[key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(data[key])))
        try:
            return cls(**data)
        except CompareConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise CompareConfigError(f"compare config: {e}") from None

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] = ()) -> "CompareConfig":
        data = read_yaml(path, "the compare config", CompareConfigError)
        try:
            return cls.from_dict(data or {}, os.path.dirname(os.path.abspath(path)), overrides)
        except CompareConfigError as e:
            raise CompareConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # -- derived -------------------------------------------------------------------------------
    @property
    def eval_path(self) -> str:
        return self.eval_data or os.path.join(self.demo_data, "eval.tsv")

    @property
    def val_path(self) -> str:
        return self.val_data or (os.path.join(self.demo_data, "val.tsv") if self.demo_data else "")


def _absolute(item: str) -> str:
    """A path given on the command line is relative to the working directory, not to the file."""
    key, sep, value = item.partition("=")
    if sep and value and key in PATH_KEYS:
        return f"{key}={os.path.abspath(os.path.expanduser(value))}"
    return item


# -- the runs ---------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run of the comparison."""

    name: str  # folder name under runs/ or grid/
    kind: str  # main | grid | ablation
    label: str  # the method, or the ablation's name
    method: str
    seed: int
    r: int
    num_experts: int
    alpha: float
    multiplier: float  # of the method's base alpha
    adapter_extra: dict = field(default_factory=dict)  # other adapter fields (competition, ...)
    folder: str = ""

    def overrides(self, config: CompareConfig) -> list[str]:
        extra = [f"adapter.{k}={json.dumps(v)}" for k, v in sorted(self.adapter_extra.items())]
        return [*config.run_overrides, f"adapter.method={self.method}", f"adapter.r={self.r}",
                f"adapter.num_experts={self.num_experts}", f"adapter.alpha={self.alpha!r}", *extra,
                f"seed={self.seed}", f"adapter.seed={self.seed}", "optim.max_minutes=null",
                f"output_dir={os.path.abspath(os.path.join(self.folder, 'train'))}"]

    @property
    def train_dir(self) -> str:
        return os.path.join(self.folder, "train")


def _run_name(method: str, label: str, multiplier: float, seed: int) -> str:
    return f"{label if label != method else method}-a{multiplier:g}-s{seed}"


def _gain_alpha(method: str, r: int, k: int, gain: float) -> float:
    """The alpha that gives `method` at rank r the update gain `gain` at uniform routing."""
    from .adapters import AdapterConfig

    unit = AdapterConfig(method=method, r=r, num_experts=k, alpha=1.0).effective_gain
    return round(gain / unit, 6)


def _ablation_adapter(name: str, base) -> dict:
    """(method, r, k, extra fields) of an ablation, from the base (TeamLoRA) adapter."""
    if name == "no_competition":
        return {"method": "teamlora", "r": base.r, "k": base.num_experts, "extra": {"competition": False}}
    if name in ("group_routing_off", "group_routing_on"):
        value = name.endswith("_on")
        if value == base.group_routing:
            raise CompareConfigError(f"compare config: ablations: {name} is what the base run already does "
                                     f"(group_routing: {str(base.group_routing).lower()}); use "
                                     f"group_routing_{'off' if value else 'on'}")
        return {"method": "teamlora", "r": base.r, "k": base.num_experts, "extra": {"group_routing": value}}
    if name in ("k2", "k8"):
        k = int(name[1:])
        if base.r % k:
            raise CompareConfigError(f"compare config: ablations: {name}: the base rank {base.r} is not divisible "
                                     f"by {k}")
        return {"method": "teamlora", "r": base.r, "k": k, "extra": {}}
    if name == "moelora_loop":
        return {"method": "moelora", "r": None, "k": base.num_experts, "extra": {"implementation": "loop"}}
    raise CompareConfigError(f"compare config: ablations: unknown {name!r}")


def _fingerprint(run) -> dict:
    """What makes a run the run it is: its resolved config without the folder it writes to."""
    data = run.to_dict()
    data.pop("output_dir", None)
    return json.loads(json.dumps(data))


def plan(config: CompareConfig) -> dict:
    """Ranks, alphas and the trainable-parameter counts of every method and ablation, counted on
    the model training builds (plan.json; reused while the base run and the config agree)."""
    from .adapters import adapter_layers, trainable_parameter_report
    from .adapters.matching import layer_shapes, matching_rank, parameter_count
    from .model import MultimodalLM
    from .train import RunConfig
    from .train.engine import build_model, model_config

    base = RunConfig.from_yaml(config.base_run, config.run_overrides)
    if base.stage != "finetune":
        raise CompareConfigError(f"compare config: base_run: stage {base.stage!r}; the comparison fine-tunes adapters")
    ref = base.adapter
    key = {"version": PLAN_VERSION, "base": _fingerprint(base), "methods": config.methods,
           "ablations": config.ablations, "alpha_policy": config.alpha_policy}
    path = os.path.join(config.out, "plan.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == key:
            logger.info("plan: reusing %s", path)
            return saved
    model_cfg, checkpoint = model_config(base)
    model = MultimodalLM.from_config(model_cfg) if checkpoint is None else MultimodalLM.from_pretrained(checkpoint)
    if adapter_layers(model.language_model):
        raise CompareConfigError(f"compare config: base_run: its model {checkpoint} already has adapters; the "
                                 "comparison starts every method from the same model without adapters")
    shapes = layer_shapes(model.language_model, ref)
    del model
    gain = ref.effective_gain
    entries: dict[str, dict] = {}

    def add(label: str, method: str, r: int, k: int, extra: dict) -> None:
        alpha = _gain_alpha(method, r, k, gain) if config.alpha_policy == "gain" else ref.alpha
        adapter = dataclasses.replace(ref, method=method, r=r, num_experts=k, alpha=alpha, **extra)
        run = RunConfig.from_yaml(config.base_run, [*config.run_overrides, f"adapter.method={method}",
                                                    f"adapter.r={r}", f"adapter.num_experts={k}",
                                                    f"adapter.alpha={alpha!r}",
                                                    *(f"adapter.{a}={json.dumps(v)}" for a, v in extra.items())])
        report = trainable_parameter_report(build_model(run))
        entries[label] = {"method": method, "r": r, "num_experts": k, "alpha": alpha, "extra": extra,
                          "expert_rank": adapter.expert_rank, "effective_gain": adapter.effective_gain,
                          "adapter_parameters": report.adapter, "trainable_parameters": report.trainable,
                          "total_parameters": report.total, "trainable_percent": report.trainable_percent,
                          "formula_count": parameter_count(shapes, adapter)}
        logger.info("plan: %-18s r=%-4d k=%d alpha=%g: %s adapter parameters (%s trainable)", label, r, k, alpha,
                    f"{report.adapter:,}", f"{report.trainable:,}")

    ranks = {}
    for method in dict.fromkeys([ref.method, *config.methods]):
        ranks[method] = ref.r if method == ref.method else matching_rank(shapes, ref, method)
        if method in config.methods or method == ref.method:
            add(method, method, ranks[method], ref.num_experts, {})
    for name in config.ablations:
        if ref.method != "teamlora" and name != "moelora_loop":
            raise CompareConfigError(f"compare config: ablations: {name} ablates TeamLoRA; the base run is {ref.method}")
        spec = _ablation_adapter(name, ref)
        add(name, spec["method"], spec["r"] or ranks[spec["method"]], spec["k"], spec["extra"])
    reference = entries[ref.method]["adapter_parameters"]
    for entry in entries.values():
        entry["vs_reference"] = entry["adapter_parameters"] / reference
    result = {"key": key, "reference": ref.method, "reference_adapter_parameters": reference,
              "reference_gain": gain, "layers": len(shapes), "entries": entries,
              "base_run": os.path.abspath(config.base_run)}
    os.makedirs(config.out, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def _spec(config: CompareConfig, the_plan: dict, label: str, kind: str, seed: int, multiplier: float) -> RunSpec:
    entry = the_plan["entries"][label]
    name = _run_name(entry["method"], label, multiplier, seed)
    spec = RunSpec(name=name, kind=kind, label=label, method=entry["method"], seed=seed, r=entry["r"],
                   num_experts=entry["num_experts"], alpha=round(entry["alpha"] * multiplier, 6),
                   multiplier=multiplier, adapter_extra=entry["extra"])
    spec.folder = os.path.join(config.out, "runs", name)
    return spec


def _read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_finished(train_dir: str) -> bool:
    """The run's final checkpoint exists and says the schedule ran to its end."""
    from .train.checkpoint import latest, read_state

    folder = latest(train_dir)
    return bool(folder and read_state(folder).get("finished"))


def train_run(config: CompareConfig, spec: RunSpec) -> bool:
    """Train (or continue) one run; False when it had finished already (nothing trained)."""
    from .train import RunConfig
    from .train.checkpoint import checkpoints

    overrides = spec.overrides(config)
    run = RunConfig.from_yaml(config.base_run, overrides)
    settings_path = os.path.join(spec.folder, "settings.json")
    settings = {"spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "folder"},
                "run": _fingerprint(run), "overrides": overrides[:-1]}
    saved = _read_json(settings_path)
    if saved is not None and saved["run"] != settings["run"]:
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
    resume = "auto" if checkpoints(spec.train_dir) else None
    overwrite = resume is None and os.path.isdir(spec.train_dir)  # a start that saved nothing: again
    logger.info("== train %s (%s, r=%d, k=%d, alpha=%g, seed %d)%s", spec.name, spec.method, spec.r,
                spec.num_experts, spec.alpha, spec.seed, ": resuming" if resume else "")
    start = time.perf_counter()
    if config.nproc > 1:
        from .train.launch import launch

        code = launch(config.base_run, overrides, config.nproc, resume=resume, overwrite=overwrite)
    else:
        from .train import train

        code = 0 if train(run, resume=resume, overwrite=overwrite).finished else 1
    seconds = time.perf_counter() - start
    sittings = _read_json(os.path.join(spec.folder, "sittings.json"), [])
    # the training loop's own time and tokens in this sitting (up to its last save), as run_state.json
    # has them: start-up (and the first run's tokenising of the mixture) does not count
    state = _read_json(os.path.join(spec.train_dir, "run_state.json"), {})
    saved = state.get("step") is not None and state.get("step") != (sittings[-1].get("step") if sittings else None)
    sittings.append({"wall_seconds": round(seconds, 2), "exit_code": code, "resumed": bool(resume),
                     "step": state.get("step"), "train_seconds": state.get("sitting_seconds", 0.0) if saved else 0.0,
                     "tokens": state.get("sitting_tokens", 0) if saved else 0})
    atomic_write_text(os.path.join(spec.folder, "sittings.json"), json.dumps(sittings, indent=1) + "\n")
    if code != 0 or not is_finished(spec.train_dir):
        raise CompareError(f"training {spec.name} exited with code {code} before its last step; its log is above, "
                           f"its run folder {spec.train_dir} (a rerun continues it)")
    return True


# -- evaluation -------------------------------------------------------------------------------
def _checkpoint_stamp(checkpoint: str) -> dict:
    from .train.checkpoint import STATE_FILE

    return {"checkpoint": os.path.abspath(checkpoint),
            "mtime": os.path.getmtime(os.path.join(checkpoint, STATE_FILE))}


def _evaluate(model, data: str, out_dir: str, limit: int, circular: bool, name: str):
    from .eval import EvalConfig, evaluate

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
    from .eval import read_mmbench

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
    from .model import MultimodalLM
    from .train.checkpoint import latest

    checkpoint = latest(spec.train_dir)
    stamp = {**_checkpoint_stamp(checkpoint), "data": os.path.abspath(config.val_path), "limit": config.val_limit}
    path = os.path.join(spec.folder, "val_score.json")
    saved = _read_json(path)
    if saved and saved.get("stamp") == stamp:
        return saved
    logger.info("== val %s on %s", spec.name, config.val_path)
    result = _evaluate(MultimodalLM.from_pretrained(checkpoint), config.val_path, os.path.join(spec.folder, "val"),
                       config.val_limit, False, checkpoint)
    loss, n = answer_loss(result.log, config.val_path)
    out = {"stamp": stamp, "answer_loss": loss, "questions": n, "vanilla": result.report["overall"]["vanilla"]}
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    return out


def evaluate_run(config: CompareConfig, spec: RunSpec) -> dict:
    """The eval report (and routing summary for routed methods) of a trained run (cached)."""
    from .model import MultimodalLM
    from .train.checkpoint import latest

    checkpoint = latest(spec.train_dir)
    routed = spec.method in ROUTED
    stamp = {**_checkpoint_stamp(checkpoint), "data": os.path.abspath(config.eval_path), "limit": config.eval_limit,
             "routing_samples": config.routing_samples if routed else None}
    path = os.path.join(spec.folder, "eval_done.json")
    saved = _read_json(path)
    eval_dir, routing_dir = os.path.join(spec.folder, "eval"), os.path.join(spec.folder, "routing")
    if saved and saved.get("stamp") == stamp and os.path.isfile(os.path.join(eval_dir, "report.json")):
        return {"report": _read_json(os.path.join(eval_dir, "report.json")),
                "routing": _read_json(os.path.join(routing_dir, "routing.json")) if routed else None}
    logger.info("== eval %s on %s", spec.name, config.eval_path)
    model = MultimodalLM.from_pretrained(checkpoint)
    report = _evaluate(model, config.eval_path, eval_dir, config.eval_limit, True, checkpoint).report
    routing = None
    if routed:
        from .eval import inspect_routing

        samples = config.routing_samples or config.eval_limit
        routing = inspect_routing(model, config.eval_path, routing_dir, max_samples=samples, plots=False,
                                  model_name=checkpoint)
    atomic_write_text(path, json.dumps({"stamp": stamp}, indent=1) + "\n")
    return {"report": report, "routing": routing}


def training_figures(spec: RunSpec) -> dict:
    """Steps, time, tokens/s and peak memory of a finished run, from its own files."""
    from .train.checkpoint import latest, read_state
    from .train.metrics import read_metrics

    state = read_state(latest(spec.train_dir))
    records = read_metrics(os.path.join(spec.train_dir, "metrics.jsonl"))
    peaks = [r["peak_mem_mb"] for r in records if r.get("peak_mem_mb") is not None]
    sittings = _read_json(os.path.join(spec.folder, "sittings.json"), [])
    seconds = sum(s["train_seconds"] for s in sittings)
    tokens = sum(s["tokens"] for s in sittings)
    return {"steps": state["step"], "total_steps": state["total_steps"], "val_loss": state.get("val_loss"),
            "train_loss": state.get("train_loss"),
            "train_seconds": round(seconds, 1),  # the training loops' time, validation and saves included
            "wall_seconds": round(sum(s["wall_seconds"] for s in sittings), 1),  # launches: start-up too
            "sittings": len(sittings),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,  # all ranks
            "peak_mem_mb": max(peaks) if peaks else None}


# -- the comparison ---------------------------------------------------------------------------
@dataclass
class CompareResult:
    out: str
    summary: dict  # compare.json's content
    trained: list[str] = field(default_factory=list)  # runs trained in this call (the others were reused)
    paths: dict[str, str] = field(default_factory=dict)


def run_compare(config: CompareConfig) -> CompareResult:
    """Run (or continue) the comparison; see the module doc. Raises CompareError when a run fails."""
    config.validate()
    os.makedirs(config.out, exist_ok=True)
    atomic_write_text(os.path.join(config.out, "compare_config.yaml"), config.to_yaml())
    if config.demo_data:
        from .demo import ensure_data

        ensure_data(config.demo_data)
    for what, path in (("eval_data", config.eval_path), ("val_data", config.val_path if config.alpha_grid else "")):
        if path and not os.path.isfile(path):
            raise CompareConfigError(f"compare config: {what}: {path} not found")
    the_plan = plan(config)
    trained: list[str] = []
    first = config.seeds[0]

    # alpha grid: every method at every multiplier, first seed, scored on the validation TSV
    chosen = {m: 1.0 for m in config.methods}
    grid: dict[str, list[dict]] = {}
    for method in config.methods if config.alpha_grid else []:
        for multiplier in config.alpha_grid:
            spec = _spec(config, the_plan, method, "grid", first, multiplier)
            if train_run(config, spec):
                trained.append(spec.name)
            score = score_on_val(config, spec)
            grid.setdefault(method, []).append({"multiplier": multiplier, "alpha": spec.alpha, "run": spec.name,
                                                "answer_loss": score["answer_loss"], "val_questions": score["questions"],
                                                "val_vanilla": score["vanilla"]})
        best = min(grid[method], key=lambda g: (g["answer_loss"], abs(math.log(g["multiplier"]))))
        chosen[method] = best["multiplier"]
        logger.info("alpha grid: %s takes alpha %g (x%g), answer loss %.4f on %d validation questions", method,
                    best["alpha"], best["multiplier"], best["answer_loss"], best["val_questions"])

    # the grid run at the chosen multiplier is the first seed's main run: the same name and folder
    main = [_spec(config, the_plan, m, "main", s, chosen[m]) for m in config.methods for s in config.seeds]
    ablations = []
    for name in config.ablations:
        source = the_plan["entries"][name]["method"]
        spec = _spec(config, the_plan, name, "ablation", first, chosen.get(source, 1.0))
        ablations.append(spec)
    for spec in [*main, *ablations]:
        if train_run(config, spec):
            trained.append(spec.name)

    # the eval TSV is read only now, once every run has trained
    results = {}
    for spec in [*main, *ablations]:
        results[spec.name] = {"spec": spec, **evaluate_run(config, spec), "training": training_figures(spec)}
    summary = summarise(config, the_plan, main, ablations, results, grid, chosen)
    json_path, md_path = os.path.join(config.out, "compare.json"), os.path.join(config.out, "compare.md")
    atomic_write_text(json_path, json.dumps(summary, indent=1) + "\n")
    atomic_write_text(md_path, format_markdown(summary))
    paths = {"json": json_path, "md": md_path}
    try:
        paths["plot"] = plot(summary, os.path.join(config.out, "compare.png"))
    except ImportError as e:
        logger.warning("no compare.png: %s", e)
    return CompareResult(config.out, summary, trained, paths)


def plot(summary: dict, path: str) -> str:
    """compare.png: vanilla and circular accuracy per method (mean, error bars: std over seeds)
    with chance, and tokens/s relative to LoRA. Needs matplotlib."""
    from .eval.plots import _matplotlib
    from .files import atomic_write

    plt = _matplotlib()
    names = list(summary["methods"])
    rows = list(summary["methods"].values())
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 3.6))
    for offset, metric, chance in ((-0.2, "vanilla", summary["chance"]), (0.2, "circular", summary["chance_circular"])):
        means = [100 * (a[metric]["mean"] or 0.0) for a in rows]
        errors = [100 * (a[metric]["std"] or 0.0) for a in rows]
        bars = acc.bar([i + offset for i in range(len(names))], means, 0.4, yerr=errors, capsize=3, label=metric)
        acc.axhline(100 * chance, ls="--", lw=1, color=bars.patches[0].get_facecolor(), label=f"{metric} chance")
    acc.set_xticks(range(len(names)), names)
    acc.set_ylabel("accuracy %")
    acc.set_title(f"{summary['questions']} questions, {len(summary['config']['seeds'])} seed(s)")
    acc.legend(fontsize=7)
    ratios = [a["tokens_per_s_vs_lora"] or 0.0 for a in rows]
    speed.bar(range(len(names)), ratios, 0.6)
    speed.axhline(1.0, ls="--", lw=1, color="grey")
    speed.set_xticks(range(len(names)), names)
    speed.set_ylabel("training tokens/s vs LoRA")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


# -- the reports ------------------------------------------------------------------------------
def _mean_std(values: list[float | None]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values)}


def _routing_summary(routing: dict | None) -> dict | None:
    if not routing:
        return None
    sep = routing.get("separation") or {}
    return {"headline": sep.get("headline"), "js_bits": sep.get("mean_headline_js_bits"),
            "mi_soft_bits": sep.get("mean_mi_soft_bits"), "mi_top1_bits": sep.get("mean_mi_top1_bits"),
            "samples": routing.get("samples")}


def _run_row(result: dict) -> dict:
    spec, report = result["spec"], result["report"]
    overall = report["overall"]
    return {"run": spec.name, "seed": spec.seed, "alpha": spec.alpha, "vanilla": overall["vanilla"],
            "circular": overall["circular"], "vanilla_ci95": overall["vanilla_ci95"],
            "circular_ci95": overall["circular_ci95"], "n": overall["n"],
            "by_category": {c: {"vanilla": b["vanilla"], "circular": b["circular"], "n": b["n"]}
                            for c, b in report.get("by_category", {}).items()},
            "training": result["training"], "routing": _routing_summary(result["routing"])}


def _aggregate(label: str, rows: list[dict], entry: dict) -> dict:
    categories = sorted({c for r in rows for c in r["by_category"]})
    return {"label": label, "method": entry["method"], "r": entry["r"], "num_experts": entry["num_experts"],
            "alpha": rows[0]["alpha"], "effective_gain": entry["effective_gain"] * rows[0]["alpha"] / entry["alpha"],
            "adapter_parameters": entry["adapter_parameters"], "trainable_parameters": entry["trainable_parameters"],
            "trainable_percent": entry["trainable_percent"], "vs_reference": entry["vs_reference"],
            "seeds": [r["seed"] for r in rows], "n": rows[0]["n"],
            "vanilla": _mean_std([r["vanilla"] for r in rows]), "circular": _mean_std([r["circular"] for r in rows]),
            "by_category": {c: {"n": next(r["by_category"][c]["n"] for r in rows if c in r["by_category"]),
                                "vanilla": _mean_std([r["by_category"].get(c, {}).get("vanilla") for r in rows]),
                                "circular": _mean_std([r["by_category"].get(c, {}).get("circular") for r in rows])}
                            for c in categories},
            "tokens_per_s": _mean_std([r["training"]["tokens_per_s"] for r in rows]),
            "train_seconds": _mean_std([r["training"]["train_seconds"] for r in rows]),
            "peak_mem_mb": _mean_std([r["training"]["peak_mem_mb"] for r in rows]),
            "steps": sorted({r["training"]["total_steps"] for r in rows}),
            "routing_js_bits": _mean_std([(r["routing"] or {}).get("js_bits") for r in rows]),
            "routing_mi_soft_bits": _mean_std([(r["routing"] or {}).get("mi_soft_bits") for r in rows]),
            "runs": rows}


def verdict(a: dict, b: dict, metric: str) -> dict:
    """Whether `a`'s and `b`'s `metric` differ by more than their seed spread. With 2+ seeds each:
    outside when |mean_a - mean_b| > std_a + std_b. With one seed there is no spread: the Wilson
    95% intervals of the single runs stand in (outside when they do not overlap)."""
    ma, mb = a[metric]["mean"], b[metric]["mean"]
    if ma is None or mb is None:
        return {"delta": None, "inside": None, "basis": "not measured"}
    delta = ma - mb
    if a[metric]["std"] is not None and b[metric]["std"] is not None:
        spread = a[metric]["std"] + b[metric]["std"]
        return {"delta": delta, "inside": abs(delta) <= spread, "basis": "seed spread", "spread": spread}
    ca, cb = a["runs"][0][f"{metric}_ci95"], b["runs"][0][f"{metric}_ci95"]
    overlap = ca[0] <= cb[1] and cb[0] <= ca[1]
    return {"delta": delta, "inside": overlap, "basis": "one seed: Wilson 95% intervals (no seed spread measured)"}


def summarise(config: CompareConfig, the_plan: dict, main: list[RunSpec], ablations: list[RunSpec], results: dict,
              grid: dict, chosen: dict) -> dict:
    methods = {}
    for method in config.methods:
        rows = [_run_row(results[s.name]) for s in main if s.label == method]
        methods[method] = _aggregate(method, rows, the_plan["entries"][method])
    lora = methods.get("lora")
    for agg in methods.values():
        agg["tokens_per_s_vs_lora"] = (agg["tokens_per_s"]["mean"] / lora["tokens_per_s"]["mean"]
                                       if lora and lora["tokens_per_s"]["mean"] and agg["tokens_per_s"]["mean"]
                                       else None)
        agg["train_time_vs_lora"] = (agg["train_seconds"]["mean"] / lora["train_seconds"]["mean"]
                                     if lora and lora["train_seconds"]["mean"] else None)
    reference = the_plan["reference"]
    comparisons = {}
    if reference in methods:
        for method, agg in methods.items():
            if method != reference:
                comparisons[f"{reference}_vs_{method}"] = {
                    m: verdict(methods[reference], agg, m) for m in ("vanilla", "circular")}
    ablation_rows = {}
    for spec in ablations:
        agg = _aggregate(spec.label, [_run_row(results[spec.name])], the_plan["entries"][spec.label])
        against = "moelora" if spec.label == "moelora_loop" else reference
        if against in methods:
            same_seed = dict(methods[against])
            same_seed["runs"] = [r for r in methods[against]["runs"] if r["seed"] == spec.seed]
            for m in ("vanilla", "circular"):
                same_seed[m] = _mean_std([r[m] for r in same_seed["runs"]])
            agg["against"] = against
            agg["verdict"] = {m: verdict(agg, same_seed, m) for m in ("vanilla", "circular")}
            base_rate = _mean_std([r["training"]["tokens_per_s"] for r in same_seed["runs"]])["mean"]
            agg["tokens_per_s_vs_against"] = (agg["tokens_per_s"]["mean"] / base_rate
                                              if base_rate and agg["tokens_per_s"]["mean"] else None)
        ablation_rows[spec.label] = agg
    steps = sorted({s for agg in [*methods.values(), *ablation_rows.values()] for s in agg["steps"]})
    first_report = results[main[0].name]["report"]["overall"]
    return {"format": "mm_teamlora.compare/1", "config": config.to_dict(), "base_run": the_plan["base_run"],
            "eval_data": os.path.abspath(config.eval_path), "reference": reference,
            "reference_adapter_parameters": the_plan["reference_adapter_parameters"],
            "reference_gain": the_plan["reference_gain"], "adapted_layers": the_plan["layers"],
            "steps": steps, "same_steps": len(steps) == 1,
            "feature_cache": bool(the_plan["key"]["base"].get("feature_cache")),
            "chance": first_report["chance"], "chance_circular": first_report["chance_circular"],
            "questions": first_report["n"], "methods": methods, "comparisons": comparisons,
            "alpha_grid": {"multipliers": config.alpha_grid, "scores": grid, "chosen": chosen} if grid else None,
            "ablations": ablation_rows,
            "not_done": ["causal masking test (mask image-/text-preferred experts vs a random-mask control)"]}


def _pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_markdown(summary: dict) -> str:
    """compare.md: what was compared and how, the tables, and plain words on the seed spread."""
    c = summary["config"]
    methods = summary["methods"]
    seeds = c["seeds"]
    lines = [f"# mm-teamlora compare: {', '.join(methods)} at matched trainable parameters", "",
             f"- base run: `{summary['base_run']}`; eval: `{summary['eval_data']}` ({summary['questions']} "
             f"questions, likelihood, CircularEval over every rotation)",
             f"- seeds {seeds} for every method (data order, dropout and adapter initialisation); "
             f"{'the same' if summary['same_steps'] else 'NOT the same'} optimizer steps for every run: "
             f"{', '.join(map(str, summary['steps']))} (never a time budget)",
             f"- parameters matched to {summary['reference']}'s {summary['reference_adapter_parameters']:,} adapter "
             f"parameters over {summary['adapted_layers']} adapted layers (counted on the model training builds)",
             "- alpha: " + (f"each method gets the reference's update gain {summary['reference_gain']:g} at uniform "
                            "routing" if c["alpha_policy"] == "gain" else "the base run's alpha for every method")
             + (", times the multiplier the alpha grid chose on the validation split" if summary["alpha_grid"] else
                "; no alpha grid was run"),
             f"- chance: {100 * summary['chance']:.1f}% vanilla, {100 * summary['chance_circular']:.2f}% circular", "",
             "## Accuracy and cost", "",
             "| method | r | k | alpha | gain | adapter params | vs ref | trainable | vanilla % | circular % | "
             "tokens/s | tokens/s vs LoRA | train time vs LoRA | peak mem MB | routing JS bits | routing MI bits |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, a in methods.items():
        lines.append(f"| {name} | {a['r']} | {a['num_experts'] if a['method'] in ROUTED else '-'} | {a['alpha']:g} | "
                     f"{a['effective_gain']:g} | {a['adapter_parameters']:,} | {a['vs_reference']:.3f} | "
                     f"{a['trainable_parameters']:,} | {_pm(a['vanilla'])} | {_pm(a['circular'])} | "
                     f"{_pm(a['tokens_per_s'], 1.0, 0)} | {_ratio(a['tokens_per_s_vs_lora'])} | "
                     f"{_ratio(a['train_time_vs_lora'])} | {_pm(a['peak_mem_mb'], 1.0, 0)} | "
                     f"{_pm(a['routing_js_bits'], 1.0, 3)} | {_pm(a['routing_mi_soft_bits'], 1.0, 3)} |")
    lines += ["", f"Mean ± sample std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
              f"{' (one seed: no spread)' if len(seeds) == 1 else ''}. Train time: the training loops' time over "
              "every sitting (validation and saves included, start-up not); tokens/s: the tokens of those loops "
              "(all ranks) over that time; "
              "peak memory: rank 0's, as the training metrics record it. Routing: image vs text tokens, mean over "
              "adapted layers, on router probabilities."]
    if summary.get("feature_cache"):
        lines += ["", "The vision feature cache was on: the first run to train computed the tower's features of "
                  "the images, later runs read them, so the time and tokens/s ratios favour the runs trained later "
                  f"(order: {', '.join(methods)}, seed by seed within each method)."]
    lines += ["", "## Inside the seed spread?", ""]
    for key, verdicts in summary["comparisons"].items():
        ref, other = key.split("_vs_")
        for metric, v in verdicts.items():
            lines.append(_verdict_line(ref, other, metric, v))
    if not summary["comparisons"]:
        lines.append(f"- the reference ({summary['reference']}) is not among the methods: no comparison made")
    categories = sorted({cat for a in methods.values() for cat in a["by_category"]})
    if categories:
        lines += ["", "## By category (vanilla % / circular %)", "",
                  "| category | n | " + " | ".join(methods) + " |", "| --- | ---: |" + " --- |" * len(methods)]
        for cat in categories:
            n = next(a["by_category"][cat]["n"] for a in methods.values() if cat in a["by_category"])
            cells = [f"{_pm(a['by_category'][cat]['vanilla'])} / {_pm(a['by_category'][cat]['circular'])}"
                     if cat in a["by_category"] else "-" for a in methods.values()]
            lines.append(f"| {cat} | {n} | " + " | ".join(cells) + " |")
    grid = summary["alpha_grid"]
    if grid:
        lines += ["", "## Alpha grid (first seed, answer-token loss on the validation split; lowest wins)", "",
                  "| method | multiplier | alpha | answer loss | val vanilla % | chosen |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for method, rows in grid["scores"].items():
            for g in rows:
                lines.append(f"| {method} | {g['multiplier']:g} | {g['alpha']:g} | {g['answer_loss']:.4f} | "
                             f"{100 * g['val_vanilla']:.1f} | {'yes' if g['multiplier'] == grid['chosen'][method] else ''} |")
    else:
        lines += ["", "No alpha grid was run: every method uses the alpha above (gain-matched or the base alpha)."]
    if summary["ablations"]:
        lines += ["", f"## Ablations (seed {seeds[0]}, against the same seed's run)", "",
                  "| ablation | against | r | k | adapter params | vanilla % | circular % | tokens/s vs against | "
                  "routing JS bits |", "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
        for name, a in summary["ablations"].items():
            lines.append(f"| {name} | {a.get('against', '-')} | {a['r']} | {a['num_experts']} | "
                         f"{a['adapter_parameters']:,} | {_pm(a['vanilla'])} | {_pm(a['circular'])} | "
                         f"{_ratio(a.get('tokens_per_s_vs_against'))} | {_pm(a['routing_js_bits'], 1.0, 3)} |")
        lines.append("")
        for name, a in summary["ablations"].items():
            for metric, v in (a.get("verdict") or {}).items():
                lines.append(_verdict_line(name, a["against"], metric, v))
    else:
        lines += ["", "No ablations were run."]
    lines += ["", "Not yet measured by this command: " + "; ".join(summary["not_done"]) + ".", ""]
    return "\n".join(lines)


def _verdict_line(a: str, b: str, metric: str, v: dict) -> str:
    if v["delta"] is None:
        return f"- {a} vs {b}, {metric}: not measured"
    where = "INSIDE" if v["inside"] else "outside"
    return (f"- {a} vs {b}, {metric} accuracy: {100 * v['delta']:+.1f} points, {where} the "
            f"{'seed spread' if v['basis'] == 'seed spread' else 'single runs’ 95% intervals'}"
            + (f" (± {100 * v['spread']:.1f})" if "spread" in v else " (one seed: no seed spread measured)")
            + (": not a difference this comparison can claim" if v["inside"] else ""))


def format_table(result: CompareResult) -> str:
    """What the CLI prints: the accuracy table and where the reports are."""
    s = result.summary
    lines = [f"{'method':12} {'params':>12} {'vanilla %':>14} {'circular %':>14} {'tok/s vs LoRA':>14}"]
    for name, a in s["methods"].items():
        lines.append(f"{name:12} {a['adapter_parameters']:>12,} {_pm(a['vanilla']):>14} {_pm(a['circular']):>14} "
                     f"{_ratio(a['tokens_per_s_vs_lora']):>14}")
    lines.append(f"chance {100 * s['chance']:.1f}% vanilla, {100 * s['chance_circular']:.2f}% circular; "
                 f"{s['questions']} questions; steps {', '.join(map(str, s['steps']))}")
    lines.append(f"trained now: {', '.join(result.trained) or 'nothing (every run had finished)'}")
    lines += [f"  {k:5} {v}" for k, v in result.paths.items()]
    return "\n".join(lines)
