"""The comparison's config: `CompareConfig` (one YAML file), its validation, its round trip
through YAML and the command line's KEY=VALUE overrides, and the errors of the comparison."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..files import read_yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("lora", "moelora", "hydralora", "teamlora")
ROUTED = ("moelora", "hydralora", "teamlora")
ABLATIONS = ("no_competition", "group_routing_off", "group_routing_on", "k2", "k8", "moelora_loop")
ALPHA_POLICIES = ("gain", "same")
PATH_KEYS = ("base_run", "eval_data", "val_data", "demo_data", "binding_data")


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
    """One comparison as one YAML file (see the package doc); input paths resolve against the
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
    masking_experts: int = 1  # experts masked per layer in the causal masking test (fewer than each run's k)
    masking_seed: int = 0  # seed of its first random-mask draw (the others: seed + 1, ...)
    masking_draws: int = 3  # random-mask draws of its control (1: no spread for the reading to compare with)
    run_overrides: list[str] = field(default_factory=list)  # dotted KEY=VALUE, applied to every run
    binding_steps: int = 0  # cap of each run's own binding stage before training (0: no such stage)
    binding_data: str = ""  # its mixture YAML ("": demo_data's binding.yaml)
    binding_val: int = 64  # binding records held out for its stop rule (0: it runs all binding_steps)

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
        for key in ("eval_data", "val_data", "demo_data", "binding_data", "out"):
            if not isinstance(getattr(self, key), str):
                _fail(key, f"must be a path, got {getattr(self, key)!r}")
        if not self.out:
            _fail("out", "must name a folder")
        self.eval_limit = _int("eval_limit", self.eval_limit, 0)
        self.val_limit = _int("val_limit", self.val_limit, 0)
        self.nproc = _int("nproc", self.nproc, 1)
        self.routing_samples = _int("routing_samples", self.routing_samples, 0)
        self.masking_experts = _int("masking_experts", self.masking_experts, 1)
        self.masking_seed = _int("masking_seed", self.masking_seed, 0)
        self.masking_draws = _int("masking_draws", self.masking_draws, 1)
        self.binding_steps = _int("binding_steps", self.binding_steps, 0)
        self.binding_val = _int("binding_val", self.binding_val, 0)
        if self.binding_steps and not self.binding_data and not self.demo_data:
            _fail("binding_steps", "the binding stage trains on binding_data: give it (or demo_data, whose "
                                   "binding.yaml is used)")
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
        from ..train.config import RunConfigError, apply_overrides

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
    def binding_path(self) -> str:
        return self.binding_data or (os.path.join(self.demo_data, "binding.yaml") if self.demo_data else "")

    @property
    def val_path(self) -> str:
        return self.val_data or (os.path.join(self.demo_data, "val.tsv") if self.demo_data else "")


def _absolute(item: str) -> str:
    """A path given on the command line is relative to the working directory, not to the file."""
    key, sep, value = item.partition("=")
    if sep and value and key in PATH_KEYS:
        return f"{key}={os.path.abspath(os.path.expanduser(value))}"
    return item
