"""Phase 1, the plan: each method's rank matched to the reference's trainable parameters, its alpha,
the counts on the model training builds (plan.json), and the runs (`RunSpec`) with their folders."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field

from ..files import atomic_write_text
from .config import CompareConfig, CompareConfigError

PLAN_VERSION = 1
logger = logging.getLogger(__name__)


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

    def _adapter_and_seed(self, config: CompareConfig) -> list[str]:
        extra = [f"adapter.{k}={json.dumps(v)}" for k, v in sorted(self.adapter_extra.items())]
        return [*config.run_overrides, f"adapter.method={self.method}", f"adapter.r={self.r}",
                f"adapter.num_experts={self.num_experts}", f"adapter.alpha={self.alpha!r}", *extra,
                f"seed={self.seed}", f"adapter.seed={self.seed}"]

    def overrides(self, config: CompareConfig) -> list[str]:
        """The run's overrides of the base run; output_dir last. With a binding stage the run
        continues from that stage's final checkpoint (its adapters and projector)."""
        start = [f"model={os.path.abspath(self.binding_dir)}"] if config.binding_steps else []
        return [*self._adapter_and_seed(config), *start, "optim.max_minutes=null",
                f"output_dir={os.path.abspath(self.train_dir)}"]

    def binding_overrides(self, config: CompareConfig) -> list[str]:
        """The run's binding stage (`demo.binding_stage_overrides`: constant rate, stop rule, no
        time budget): the same model, adapter and seed as the run, on the comparison's binding data."""
        from ..demo import binding_stage_overrides

        return [*self._adapter_and_seed(config),
                *binding_stage_overrides(config.binding_path, config.binding_val, config.binding_steps,
                                         os.path.abspath(self.binding_dir))]

    @property
    def train_dir(self) -> str:
        return os.path.join(self.folder, "train")

    @property
    def binding_dir(self) -> str:
        return os.path.join(self.folder, "binding")


def _run_name(method: str, label: str, multiplier: float, seed: int) -> str:
    return f"{label if label != method else method}-a{multiplier:g}-s{seed}"


def _gain_alpha(method: str, r: int, k: int, gain: float) -> float:
    """The alpha that gives `method` at rank r the update gain `gain` at uniform routing."""
    from ..adapters import AdapterConfig

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


def fingerprint(run) -> dict:
    """What makes a run the run it is: its resolved config without the folder it writes to."""
    data = run.to_dict()
    data.pop("output_dir", None)
    return json.loads(json.dumps(data))


def plan(config: CompareConfig) -> dict:
    """Ranks, alphas and the trainable-parameter counts of every method and ablation, counted on
    the model training builds (plan.json; reused while the base run and the config agree)."""
    from ..adapters import adapter_layers, trainable_parameter_report
    from ..adapters.matching import layer_shapes, matching_rank, parameter_count
    from ..model import MultimodalLM
    from ..train import RunConfig
    from ..train.engine import build_model, model_config

    base = RunConfig.from_yaml(config.base_run, config.run_overrides)
    if base.stage != "finetune":
        raise CompareConfigError(f"compare config: base_run: stage {base.stage!r}; the comparison fine-tunes adapters")
    ref = base.adapter
    saved = saved_plan(config)
    if saved is not None:
        logger.info("plan: reusing %s", os.path.join(config.out, "plan.json"))
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
    result = {"key": _plan_key(config), "reference": ref.method, "reference_adapter_parameters": reference,
              "reference_gain": gain, "layers": len(shapes), "entries": entries,
              "base_run": os.path.abspath(config.base_run)}
    os.makedirs(config.out, exist_ok=True)
    atomic_write_text(os.path.join(config.out, "plan.json"), json.dumps(result, indent=1) + "\n")
    return result


def _plan_key(config: CompareConfig) -> dict:
    from ..train import RunConfig

    return {"version": PLAN_VERSION, "base": fingerprint(RunConfig.from_yaml(config.base_run, config.run_overrides)),
            "methods": config.methods, "ablations": config.ablations, "alpha_policy": config.alpha_policy}


def saved_plan(config: CompareConfig) -> dict | None:
    """The plan.json in `out` when it was made for this config (base run, methods, ablations, alpha policy)."""
    path = os.path.join(config.out, "plan.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return saved if saved.get("key") == _plan_key(config) else None


def run_spec(config: CompareConfig, the_plan: dict, label: str, kind: str, seed: int, multiplier: float) -> RunSpec:
    entry = the_plan["entries"][label]
    name = _run_name(entry["method"], label, multiplier, seed)
    spec = RunSpec(name=name, kind=kind, label=label, method=entry["method"], seed=seed, r=entry["r"],
                   num_experts=entry["num_experts"], alpha=round(entry["alpha"] * multiplier, 6),
                   multiplier=multiplier, adapter_extra=entry["extra"])
    spec.folder = os.path.join(config.out, "runs", name)
    return spec


def grid_runs(config: CompareConfig, the_plan: dict) -> dict[str, list[RunSpec]]:
    """The alpha grid, in training order: each method at each multiplier, at the first seed."""
    return {m: [run_spec(config, the_plan, m, "grid", config.seeds[0], a) for a in config.alpha_grid]
            for m in (config.methods if config.alpha_grid else [])}


def choose_multiplier(scores: list[dict]) -> dict:
    """The grid score with the lowest answer loss; a tie goes to the multiplier closest to 1."""
    return min(scores, key=lambda g: (g["answer_loss"], abs(math.log(g["multiplier"]))))


def later_runs(config: CompareConfig, the_plan: dict, chosen: dict[str, float]) -> tuple[list[RunSpec], list[RunSpec]]:
    """The main runs (method x seed, at the method's chosen multiplier; the grid run at that
    multiplier is the first seed's) and the ablations (first seed, at their method's multiplier),
    in training order."""
    main = [run_spec(config, the_plan, m, "main", s, chosen[m]) for m in config.methods for s in config.seeds]
    ablations = [run_spec(config, the_plan, name, "ablation", config.seeds[0],
                          chosen.get(the_plan["entries"][name]["method"], 1.0)) for name in config.ablations]
    return main, ablations

