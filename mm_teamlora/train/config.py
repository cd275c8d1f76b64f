"""`RunConfig`: one training run as one YAML file (a dataclass tree that round-trips).

    model: smollm2-dinov2-small      # a preset, a checkpoint or run folder (continue from it), or a mapping:
                                     #   {preset: NAME, vision: {pool_to: 16}} or MultimodalConfig fields
    data: ../demo.yaml               # a data_configs mixture
    output_dir: runs/demo-teamlora
    adapter: {method: teamlora, r: 64, num_experts: 4, alpha: 32}   # any AdapterConfig field
    optim: {lr: 2.0e-4, projector_lr: 1.0e-3, micro_batch_size: 4, grad_accum: 2, epochs: 1}
    deepspeed: 2                     # ZeRO stage 0 / 2 / 3, or a ZeRO JSON ("auto" values filled from here)

Overrides are dotted `key=value` pairs (`adapter.method=lora optim.lr=1e-4`), values read as YAML.
Input paths (`data`, a checkpoint `model` or the folders a model mapping names, a `deepspeed` JSON)
resolve against the run file's folder, or the working directory when given as overrides;
`output_dir` against the working directory. Unknown keys are errors that name the allowed
ones. The model's tokenizer and tokens per image are the ones that count: the mixture's own
`tokenizer` key serves `data check` only.

`feature_cache` (default false) stores the frozen vision tower's output features on disk, keyed by
the tower's fingerprint and each preprocessed image's bytes, and skips the tower for stored images
from the second epoch on (or the first, when an earlier run stored them): `true` keeps them under
the package cache (`$MM_TEAMLORA_CACHE/vision_features`), a string names the folder (relative to
the working directory, as `output_dir`). The log says whether it is on and counts its hits; it
turns itself off where the tower trains or the preprocessing is random. See train/feature_cache.py.

`supervised_logits` (default true) runs the LM head only at positions whose next token is
supervised (transformers' boolean `logits_to_keep`); false runs it at every position and keeps
those, as LLaVA's and LLaMA-Factory's trainers do: the same loss, for comparisons, or a model whose
forward mishandles a boolean `logits_to_keep`.

`seed` sets the data order, dropout and, unless `adapter.seed` is given, the adapter's
initialisation. `stop_at_val_loss` ends a run on evidence rather than on a step count: at the first
validation (every `eval_steps`) whose loss per supervised token is at or below it, the run saves,
counts as finished and says so in run_state.json (`stopped_by`); the schedule is unchanged, so pair
it with `optim.schedule: constant` when the step count is only a cap. `stage: pretrain_projector` trains the projector alone (no adapters, the mixture's
template forced to `plain`), as LLaVA's stage 1.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..adapters import AdapterConfig
from ..files import read_yaml
from ..model import MODEL_PRESETS

STAGES = ("finetune", "pretrain_projector")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
ZERO_STAGES = (0, 1, 2, 3)


class RunConfigError(ValueError):
    """A run config that cannot run; raised before any process group starts."""


def _fail(where: str, message: str) -> typing.NoReturn:
    raise RunConfigError(f"run config: {where}: {message}")


def _number(where: str, value: Any, kind=float, minimum=None, positive=False, optional=False):
    """`value` as an int or float (numeric strings too: YAML reads `2e-4` as a string)."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            _fail(where, f"must be a number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        _fail(where, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if positive and not value > 0:
        _fail(where, f"must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"must be >= {minimum}, got {value!r}")
    return value


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, f"must be true or false, got {value!r}")
    return value


def _choice(where: str, value: Any, choices) -> Any:
    if value not in choices:
        _fail(where, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


@dataclass
class OptimConfig:
    """Optimisation: AdamW on adapters (+ routers and M, without decay) and the projector.

    The schedule runs over `max_steps` optimizer steps, or `epochs` passes over the training set
    when `max_steps` is not given; `max_minutes` ends a run early (with a checkpoint) and, alone, never
    changes the schedule. `fit_to_minutes` (needs `max_minutes`) fits the schedule to the time instead:
    after the warm-up (and at least train.run.FIT_AFTER_STEPS steps) rank 0 measures this sitting's seconds per
    step, validation and saving included, and shortens the schedule to the steps that fit in what is
    left of `max_minutes` (x FIT_MARGIN; never longer than planned), so a time-bounded run ends with
    its decay done instead of being cut in the middle of it. After each later save or validation of
    that sitting, and every FIT_AFTER_STEPS steps, it measures again (the larger of the sitting's pace
    and its latest steps' pace, so a machine that slows down is seen in time) and may shorten the
    schedule further (never lengthen it, nor shorten it by under 2% of the steps left). The fitted length is saved with the checkpoint. One optimizer step = `grad_accum` micro-batches of
    `micro_batch_size` on every rank: global batch = micro_batch_size x grad_accum x ranks."""

    lr: float = 2e-4
    projector_lr: float | None = None  # None: the same as lr
    weight_decay: float = 0.0  # never on routers, M, group biases, biases or norms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    epochs: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    fit_to_minutes: bool = False
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self) -> None:
        w = "optim."
        self.lr = _number(w + "lr", self.lr, positive=True)
        self.projector_lr = _number(w + "projector_lr", self.projector_lr, positive=True, optional=True)
        self.weight_decay = _number(w + "weight_decay", self.weight_decay, minimum=0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            _fail(w + "betas", f"must be two numbers, got {self.betas!r}")
        self.betas = [_number(w + "betas", b, minimum=0) for b in self.betas]
        self.eps = _number(w + "eps", self.eps, positive=True)
        self.warmup_ratio = _number(w + "warmup_ratio", self.warmup_ratio, minimum=0)
        if self.warmup_ratio >= 1:
            _fail(w + "warmup_ratio", f"must be below 1, got {self.warmup_ratio}")
        _choice(w + "schedule", self.schedule, SCHEDULES)
        self.min_lr_ratio = _number(w + "min_lr_ratio", self.min_lr_ratio, minimum=0)
        self.epochs = _number(w + "epochs", self.epochs, positive=True)
        self.max_steps = _number(w + "max_steps", self.max_steps, int, positive=True, optional=True)
        self.max_minutes = _number(w + "max_minutes", self.max_minutes, positive=True, optional=True)
        self.fit_to_minutes = _flag(w + "fit_to_minutes", self.fit_to_minutes)
        if self.fit_to_minutes and self.max_minutes is None:
            _fail(w + "fit_to_minutes", "needs optim.max_minutes (the time to fit the schedule to)")
        self.micro_batch_size = _number(w + "micro_batch_size", self.micro_batch_size, int, positive=True)
        self.grad_accum = _number(w + "grad_accum", self.grad_accum, int, positive=True)
        self.max_grad_norm = _number(w + "max_grad_norm", self.max_grad_norm, positive=True, optional=True)

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * world_size


@dataclass
class RunConfig:
    data: str  # a mixture YAML
    model: str | dict = "tiny-random"
    output_dir: str = "runs/train"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    stage: str = "finetune"
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "fp32"  # bf16 for GPUs; CPUs without native bf16 run it ~100x slower
    deepspeed: int | str = 2  # ZeRO stage, or the path of a ZeRO JSON
    gradient_checkpointing: bool = False
    feature_cache: bool | str = False  # true: under the package cache; a string: that folder
    supervised_logits: bool = True  # the LM head only where a label is (false: everywhere, as LLaVA; same loss)
    dataloader_workers: int = 0
    val_samples: int = 0  # records held out of the training mixture for the validation loss
    save_steps: int = 0  # a checkpoint every N optimizer steps (0: only at the end)
    save_minutes: float | None = None  # ... and/or every M minutes of training
    save_total_limit: int = 3  # checkpoints kept (the newest); 0 keeps all
    eval_steps: int = 0  # validation loss every N steps (0: only at the end, when val_samples > 0)
    stop_at_val_loss: float | None = None  # end the run (finished) at the first validation at or below this
    log_steps: int = 10  # metrics line, expert usage by token group
    seed: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = _build(AdapterConfig, self.adapter, "adapter")
        if isinstance(self.optim, dict):
            self.optim = _build(OptimConfig, self.optim, "optim")
        for key, kind in (("adapter", AdapterConfig), ("optim", OptimConfig)):
            if not isinstance(getattr(self, key), kind):
                _fail(key, f"expected a mapping, got {getattr(self, key)!r}")
        if not isinstance(self.data, str) or not self.data:
            _fail("data", f"must name a mixture YAML, got {self.data!r}")
        if not isinstance(self.model, (str, dict)) or not self.model:
            _fail("model", f"must be a preset, a checkpoint folder or a mapping, got {self.model!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail("output_dir", f"must be a folder, got {self.output_dir!r}")
        _choice("stage", self.stage, STAGES)
        _choice("precision", self.precision, PRECISIONS)
        if isinstance(self.deepspeed, str) and not self.deepspeed.endswith(".json"):
            self.deepspeed = _number("deepspeed", self.deepspeed, int)
        if not isinstance(self.deepspeed, str):
            self.deepspeed = _choice("deepspeed", _number("deepspeed", self.deepspeed, int), ZERO_STAGES)
        _flag("gradient_checkpointing", self.gradient_checkpointing)
        if not isinstance(self.feature_cache, (bool, str)) or self.feature_cache == "":
            _fail("feature_cache", f"must be true, false or a folder, got {self.feature_cache!r}")
        _flag("supervised_logits", self.supervised_logits)
        _flag("tensorboard", self.tensorboard)
        self.dataloader_workers = _number("dataloader_workers", self.dataloader_workers, int, minimum=0)
        self.val_samples = _number("val_samples", self.val_samples, int, minimum=0)
        self.save_steps = _number("save_steps", self.save_steps, int, minimum=0)
        self.save_minutes = _number("save_minutes", self.save_minutes, positive=True, optional=True)
        self.save_total_limit = _number("save_total_limit", self.save_total_limit, int, minimum=0)
        self.eval_steps = _number("eval_steps", self.eval_steps, int, minimum=0)
        self.stop_at_val_loss = _number("stop_at_val_loss", self.stop_at_val_loss, minimum=0, optional=True)
        if self.stop_at_val_loss is not None and not (self.val_samples and self.eval_steps):
            _fail("stop_at_val_loss", "needs val_samples > 0 and eval_steps > 0: it is checked at each validation")
        self.log_steps = _number("log_steps", self.log_steps, int, positive=True)
        self.seed = _number("seed", self.seed, int)

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, base_dir: str | None = None, overrides: list[str] = ()) -> "RunConfig":
        """Build and check; `overrides` are dotted `key=value` strings applied first; relative input
        paths resolve against `base_dir` (the run file's folder)."""
        data = apply_overrides(data, [_absolute_path_override(o) for o in overrides])
        if not isinstance(data, dict):
            _fail("top level", f"expected a mapping, got {type(data).__name__}")
        adapter = data.get("adapter")
        if isinstance(adapter, dict) and "seed" not in adapter and "seed" in data:
            data["adapter"] = {**adapter, "seed": data["seed"]}
        elif adapter is None and "seed" in data:
            data["adapter"] = {"seed": data["seed"]}
        config = _build(cls, data, "top level")
        if base_dir is not None:
            config.data = _resolve(base_dir, config.data)
            if isinstance(config.model, str) and config.model not in MODEL_PRESETS:  # a checkpoint folder
                config.model = _resolve(base_dir, config.model)
            elif isinstance(config.model, dict):
                config.model = _resolve_model_paths(base_dir, config.model)
            if isinstance(config.deepspeed, str):
                config.deepspeed = _resolve(base_dir, config.deepspeed)
        return config

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] = ()) -> "RunConfig":
        data = read_yaml(path, "the run config", RunConfigError)
        try:
            return cls.from_dict(data or {}, base_dir=os.path.dirname(os.path.abspath(path)), overrides=overrides)
        except (RunConfigError, ValueError) as e:
            raise RunConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adapter"] = {k: v for k, v in self.adapter.to_dict().items() if k != "format"}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _resolve(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _resolve_model_paths(base_dir: str, spec: dict) -> dict:
    """The folders a model mapping names (`language_model` KIND:PATH, `vision.path`,
    `projector_init`), resolved like every other input path; presets and names stay as they are."""
    spec = _deep_copy(spec)
    kind, sep, path = str(spec.get("language_model", "")).partition(":")
    if sep and kind != "preset" and path:
        spec["language_model"] = f"{kind}:{_resolve(base_dir, path)}"
    vision = spec.get("vision")
    if isinstance(vision, dict) and vision.get("kind") in ("hf", "llava-hf", "open_clip") and vision.get("path"):
        vision["path"] = _resolve(base_dir, vision["path"])
    if spec.get("projector_init"):
        spec["projector_init"] = _resolve(base_dir, spec["projector_init"])
    return spec


def _build(cls, data: Any, where: str):
    """`cls(**data)` with unknown keys named, and the class's own checks' errors located."""
    if not isinstance(data, dict):
        _fail(where, f"expected a mapping, got {data!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known) - {"format"})
    if unknown:
        prefix = "" if where == "top level" else where + "."
        _fail(where, f"unknown key(s) {', '.join(prefix + k for k in unknown)}; allowed: {', '.join(known)}")
    data = {k: v for k, v in data.items() if k != "format"}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        _fail(where, f"missing required key(s) {', '.join(missing)}")
    try:
        return cls(**data)
    except RunConfigError:
        raise
    except (TypeError, ValueError) as e:
        _fail(where, str(e))


def _absolute_path_override(item: str) -> str:
    """A path given on the command line is relative to the working directory, not to the run file."""
    key, sep, value = item.partition("=")
    if not sep or not value or key not in ("data", "model", "deepspeed", "model.language_model", "model.vision.path",
                                           "model.projector_init"):
        return item
    if key == "model" and value in MODEL_PRESETS or key == "deepspeed" and value.isdigit():
        return item
    if key == "model.language_model":
        kind, colon, path = value.partition(":")
        return item if not colon or kind == "preset" else f"{key}={kind}:{os.path.abspath(path)}"
    return f"{key}={os.path.abspath(os.path.expanduser(value))}"


def apply_overrides(data: dict, overrides) -> dict:
    """A copy of `data` with each dotted `key=value` set (values parsed as YAML)."""
    out = _deep_copy(data or {})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r}: write KEY=VALUE, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise RunConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        node, parts = out, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RunConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
