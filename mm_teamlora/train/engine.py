"""The model a run trains, its optimizer groups and schedule, and the DeepSpeed engine around them.

What trains: the adapters (with routers, interaction matrices and group biases) and the projector;
the language model and the vision tower stay frozen. `stage: pretrain_projector` trains the
projector alone. Parameter groups (AdamW):
    adapter matrices        lr            weight_decay
    routers, M, group bias  lr            no decay
    projector weights       projector_lr  weight_decay
    biases, norms (1-D)     their lr      no decay
Schedule, per optimizer step s of S with W = ceil(warmup_ratio S) warm-up steps:
    f(s) = (s + 1) / (W + 1)                                      s < W
    f(s) = m + (1 - m) (1 + cos(pi (s - W) / (S - W))) / 2        cosine (linear: 1 - progress)
with m = min_lr_ratio; every group's lr is its base lr times f.

The DeepSpeed config is built from the run config, or read from a ZeRO JSON whose "auto" values are
filled from it; a JSON value that contradicts the run config is an error before anything starts,
and the JSON may not bring its own optimizer or scheduler (the run config owns both).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from datetime import timedelta

import torch

from ..adapters import adapter_config, adapter_layers
from ..adapters.state import FUNCTIONAL_FIELDS
from ..model import MODEL_PRESETS, MultimodalConfig, MultimodalLM
from ..model.config import CONFIG_FILE
from .checkpoint import LATEST
from .config import RunConfig, RunConfigError

logger = logging.getLogger(__name__)
NO_DECAY_NAMES = ("router", "competition", "group_bias")
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_DIST_TIMEOUT_S = 1800  # MM_TEAMLORA_DIST_TIMEOUT overrides (tests use seconds, to fail fast)


# -- the model --------------------------------------------------------------------------------
def model_config(run: RunConfig) -> tuple[MultimodalConfig | None, str | None]:
    """(config to build, None) or (None, checkpoint folder to continue from)."""
    spec, dtype = run.model, PRECISION_DTYPES[run.precision]
    if isinstance(spec, str):
        if os.path.isfile(os.path.join(spec, CONFIG_FILE)):
            return None, spec
        if os.path.isfile(os.path.join(spec, LATEST)):  # a run folder: its newest checkpoint
            with open(os.path.join(spec, LATEST), encoding="utf-8") as f:
                folder = os.path.join(spec, f.read().strip())
            if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
                return None, folder
        if spec not in MODEL_PRESETS:
            where = "folder has no " + CONFIG_FILE if os.path.isdir(spec) else "is neither a checkpoint folder nor a preset"
            raise RunConfigError(f"run config: model: {spec!r} {where}; presets: {', '.join(MODEL_PRESETS)}")
        return MultimodalConfig.preset(spec, dtype=dtype), None
    spec = dict(spec)
    if spec.get("dtype", dtype) != dtype:
        raise RunConfigError(f"run config: model.dtype {spec['dtype']!r} contradicts precision {run.precision!r}")
    spec["dtype"] = dtype
    try:
        if "preset" in spec:
            name = spec.pop("preset")
            return MultimodalConfig.preset(name, vision=spec.pop("vision", None), **spec), None
        return MultimodalConfig.from_dict(spec), None
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"run config: model: {e}") from None


def build_model(run: RunConfig) -> MultimodalLM:
    """The model of the run with its trainable parts set: adapters (finetune) and projector."""
    config, checkpoint = model_config(run)
    if checkpoint is not None:
        model = MultimodalLM.from_pretrained(checkpoint).to(getattr(torch, PRECISION_DTYPES[run.precision]))
        logger.info("continuing from %s", checkpoint)
    else:
        model = MultimodalLM.from_config(config)
    has_adapters = bool(adapter_layers(model.language_model))
    if run.stage == "pretrain_projector":
        if has_adapters:
            raise RunConfigError(f"run config: stage pretrain_projector trains the projector alone, but {checkpoint} "
                                 "already has adapters")
    elif has_adapters:
        current = adapter_config(model.language_model)
        differ = [f"{f}: checkpoint {getattr(current, f)!r} vs run {getattr(run.adapter, f)!r}"
                  for f in FUNCTIONAL_FIELDS if getattr(current, f) != getattr(run.adapter, f)]
        if differ:
            raise RunConfigError("run config: adapter differs from the checkpoint's adapters it continues: "
                                 + "; ".join(differ))
    else:
        model.add_adapters(run.adapter)
    for name, param in model.language_model.named_parameters():
        param.requires_grad_(run.stage == "finetune" and param.requires_grad)
    model.vision_tower.requires_grad_(False)
    model.projector.requires_grad_(True)
    if run.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


# -- optimisation -----------------------------------------------------------------------------
def parameter_groups(model: MultimodalLM, run: RunConfig) -> list[dict]:
    """AdamW groups (see the module doc); each has a `name` for the logs. Empty groups are left out."""
    optim = run.optim
    projector_lr = optim.projector_lr or optim.lr
    groups = {"adapters": (optim.lr, optim.weight_decay), "routing": (optim.lr, 0.0),
              "projector": (projector_lr, optim.weight_decay), "projector_no_decay": (projector_lr, 0.0),
              "no_decay": (optim.lr, 0.0)}
    members: dict[str, list] = {name: [] for name in groups}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        in_projector = name.startswith("projector.")
        if param.ndim < 2:
            members["projector_no_decay" if in_projector else "no_decay"].append(param)
        elif in_projector:
            members["projector"].append(param)
        elif last in NO_DECAY_NAMES:
            members["routing"].append(param)
        else:
            members["adapters"].append(param)
    return [{"name": name, "params": members[name], "lr": lr, "weight_decay": decay}
            for name, (lr, decay) in groups.items() if members[name]]


class Schedule:
    """The lr factor f(s) of the module doc, as a callable object: LambdaLR saves an object's
    attributes with the scheduler's state (not a function's), so a length shortened by
    `fit(total)` (optim.fit_to_minutes) comes back with the checkpoint. Fitting keeps the warm-up
    W it started with; the decay then runs over the new S - W."""

    def __init__(self, total: int, warmup_ratio: float, schedule: str, min_ratio: float):
        self.total, self.planned = total, total
        self.warmup = math.ceil(warmup_ratio * total)
        self.schedule, self.min_ratio = schedule, min_ratio

    def fit(self, total: int) -> None:
        self.total = max(total, self.warmup + 1)

    @property
    def fitted(self) -> bool:
        return self.total != self.planned

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape


def build_optimizer(model: MultimodalLM, run: RunConfig, total_steps: int):
    groups = parameter_groups(model, run)
    if not groups:
        raise RunConfigError("run config: nothing to train (no parameter requires grad)")
    # fused: one kernel per group over all its tensors, instead of a Python loop of per-tensor ops (the
    # default of Hugging Face's Trainer too); the same update, ~10x faster on a 10M-element ZeRO-2 partition here
    optimizer = torch.optim.AdamW(groups, lr=run.optim.lr, betas=tuple(run.optim.betas), eps=run.optim.eps,
                                  fused=True)
    o = run.optim
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, Schedule(total_steps, o.warmup_ratio, o.schedule, o.min_lr_ratio))
    return optimizer, schedule


# -- DeepSpeed --------------------------------------------------------------------------------
def deepspeed_config(run: RunConfig, world_size: int, hidden_size: int | None = None) -> dict:
    """The engine's config: built from the run, or the run's ZeRO JSON with "auto" filled and
    checked against the run."""
    o = run.optim
    wanted = {"train_micro_batch_size_per_gpu": o.micro_batch_size, "gradient_accumulation_steps": o.grad_accum,
              "train_batch_size": o.global_batch_size(world_size), "gradient_clipping": o.max_grad_norm or 0.0}
    bf16 = run.precision == "bf16"
    if isinstance(run.deepspeed, int):
        config = {**wanted, "zero_optimization": {"stage": run.deepspeed}, "bf16": {"enabled": bf16}}
    else:
        config = _read_json(run.deepspeed)
        for key in ("optimizer", "scheduler"):
            if key in config:
                raise RunConfigError(f"{run.deepspeed}: has an {key!r} section; the run config sets the optimizer "
                                     "and the schedule (optim.*): remove it")
        if config.get("fp16", {}).get("enabled") not in (None, False, "auto"):
            raise RunConfigError(f"{run.deepspeed}: fp16 is enabled; this toolkit trains in fp32 or bf16 (precision)")
        for key, value in wanted.items():
            given = config.get(key, "auto")
            if given != "auto" and given != value:
                raise RunConfigError(f"{run.deepspeed}: {key} is {given!r} but the run config gives {value!r} "
                                     f"(optim.micro_batch_size x optim.grad_accum x {world_size} ranks); "
                                     'set it to "auto" or make them agree')
            config[key] = value
        given = config.setdefault("bf16", {}).get("enabled", "auto")
        if given != "auto" and bool(given) != bf16:
            raise RunConfigError(f"{run.deepspeed}: bf16.enabled is {given!r} but precision is {run.precision!r}")
        config["bf16"]["enabled"] = bf16
        config.pop("fp16", None)
        zero = config.setdefault("zero_optimization", {"stage": 0})
        for key, value in _zero_auto(hidden_size).items():
            if zero.get(key) == "auto":
                zero[key] = value
        left = [k for k, v in _walk(config) if v == "auto"]
        if left:
            raise RunConfigError(f"{run.deepspeed}: cannot fill \"auto\" for {left}")
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _zero_auto(hidden: int | None) -> dict:
    """The sizes Hugging Face's integration fills for "auto" (from the LM's hidden size)."""
    if hidden is None:
        return {}
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise RunConfigError(f"run config: deepspeed: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunConfigError(f"{path}: not valid JSON: {e}") from None


def _walk(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def import_deepspeed():
    """DeepSpeed on this machine's accelerator: CUDA where there is one, else the CPU (gloo). Its
    first CPU launch compiles a small communication op; the build goes into the environment."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def init_distributed() -> tuple[int, int]:
    """(rank, world size). A process started without a launcher is rank 0 of 1."""
    deepspeed = import_deepspeed()
    if not torch.distributed.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("MM_TEAMLORA_DIST_TIMEOUT", DEFAULT_DIST_TIMEOUT_S)))
        alone = {}
        if "RANK" not in os.environ:  # a group of one; no MASTER_PORT left for child processes to trip on
            alone = {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
            os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
        deepspeed.init_distributed(dist_backend=_backend(), timeout=timeout, verbose=False, auto_mpi_discovery=False,
                                   **alone)
        _unlink_shm_segment()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# DeepSpeed's CPU allreduce (its shm comm op, used when every rank of a launch is on this node:
# LOCAL_SIZE == world size) makes a /dev/shm segment per rank and never unlinks it: ~66 MB of RAM
# per rank per launch, held until reboot. deepspeed.init_distributed returns once this rank has
# mapped every rank's segment; after a barrier every rank has, so the names can go, and the memory
# is freed when the last rank exits, killed or not.
SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def _unlink_shm_segment() -> None:
    from deepspeed.accelerator import get_accelerator

    world = torch.distributed.get_world_size()
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return
    torch.distributed.barrier()
    path = SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                              port=os.environ.get("MASTER_PORT", ""), rank=torch.distributed.get_rank())
    if os.path.exists(path):
        os.unlink(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().communication_backend_name()
    return name if name in ("nccl", "gloo", "hccl", "xccl") else "gloo"


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def initialize(model: MultimodalLM, run: RunConfig, world_size: int, total_steps: int):
    """(engine, optimizer, scheduler) from `deepspeed.initialize` on the run's groups and schedule."""
    deepspeed = import_deepspeed()
    hidden = model.language_model.get_input_embeddings().weight.shape[1]
    config = deepspeed_config(run, world_size, hidden)
    optimizer, schedule = build_optimizer(model, run, total_steps)
    engine, optimizer, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                          config=config)
    return engine, optimizer, schedule


def group_names(optimizer) -> list[str]:
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client optimizer
    return [g.get("name", str(i)) for i, g in enumerate(inner.param_groups)]
