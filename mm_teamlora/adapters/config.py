"""Adapter configuration: one dataclass for every method, validated at construction.

`AdapterConfig` round-trips through JSON (`to_json` / `from_json`, `save` / `load`) and plain
dicts, so it can live in YAML files and inside checkpoints as `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..files import atomic_write_text

METHODS = ("lora", "moelora", "hydralora", "teamlora")
ROUTED_METHODS = ("moelora", "hydralora", "teamlora")
TARGET_PRESETS = ("attention", "mlp", "all-linear")
COMPETITION_NORMS = ("l1", "reference")
IMPLEMENTATIONS = ("fused", "loop")
CONFIG_FILE = "adapter_config.json"
CONFIG_FORMAT = "mm_teamlora.adapter/1"


@dataclass
class AdapterConfig:
    """What to adapt and how.

    method: `lora` (rank-r LoRA), `moelora` (k independent rank-r/k LoRAs, softmax router,
        scaling alpha/r), `hydralora` (shared A of rank r, k full-rank B's, softmax router,
        scaling alpha/r), `teamlora` (shared A split into k chunks, k B's, router + competition,
        scaling alpha/(r/k)). See ../shared/TEAMLORA.md for the maths.
    r: total rank. For `teamlora` and `moelora` each expert has rank r / num_experts.
    num_experts: k; ignored by `lora`.
    alpha: LoRA alpha; each method derives its own scaling from it (see `scaling`).
    dropout: TeamLoRA drops each chunk z_i of s*A x (as the authors' code); the other methods
        drop the adapter's input x (as peft).
    target_modules: a preset (`attention`, `mlp`, `all-linear`), a regex (any other string;
        matched in full against module names), or a list of names or dotted suffixes.
        `all-linear` never includes the output head.
    exclude_modules: names or dotted suffixes of layers never adapted; wins over targets.
    modules_to_save: names or dotted suffixes of other modules left trainable and saved with the
        adapter (e.g. a multimodal projector).
    competition: TeamLoRA's interaction matrix M on (the paper) or off (the collaboration-only
        ablation, w = k * softmax).
    competition_norm: how v = phi (I + M) becomes weights w summing to k.
        `reference`: w = k v / sum(v), the authors' form; unguarded, it divides by sum(v), which
            can approach 0 (or change sign) as M trains.
        `l1` (default): w = k v / max(sum |v|, 1e-6). Identical to `reference` whenever every
            v_j >= 0 (the usual case: M starts in [-0.1, 0.1]); otherwise the weights keep an L1
            norm of exactly k, so no |w_j| exceeds k and the sign of the sum never flips them.
    balance_weight: weight of the load-balancing loss, averaged over adapted layers.
    num_token_groups: how many integer group ids callers may pass through `routing_context`.
    group_routing: add a learned per-group bias (zero-initialised) to every router's logits. Off,
        routing is exactly the paper's; groups are then only used to record routing statistics.
    implementation: `fused` (one d_in->r and one r->d_out GEMM; what runs) or `loop` (one small
        matmul per expert: the readable reference, and MoELoRA's published form).
    seed: seeds adapter initialisation, so the same config gives the same starting adapter.
    """

    method: str = "teamlora"
    r: int = 64
    num_experts: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    competition: bool = True
    competition_norm: str = "l1"
    balance_weight: float = 0.01
    num_token_groups: int = 3
    group_routing: bool = False
    implementation: str = "fused"
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"AdapterConfig: {message}")

        if self.method not in METHODS:
            fail(f"method={self.method!r}; allowed: {', '.join(METHODS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            fail(f"r={self.r!r}; must be a positive integer (total rank)")
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int):
            fail(f"num_experts={self.num_experts!r}; must be an integer")
        if self.method in ROUTED_METHODS:
            if self.num_experts < 2:
                fail(f"num_experts={self.num_experts} for {self.method}; needs at least 2 experts")
            if self.method in ("teamlora", "moelora") and self.r % self.num_experts:
                fail(
                    f"r={self.r} is not divisible by num_experts={self.num_experts}; {self.method} "
                    f"gives each expert rank r / num_experts"
                )
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            fail(f"alpha={self.alpha!r}; must be a positive number")
        self.alpha = float(self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            fail(f"dropout={self.dropout!r}; must be in [0, 1)")
        self.dropout = float(self.dropout)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = _name_list("target_modules", self.target_modules, fail)
            if not self.target_modules:
                fail("target_modules is empty; give names, a regex or a preset " f"{TARGET_PRESETS}")
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            fail(f"target_modules={self.target_modules!r}; give a preset {TARGET_PRESETS}, a regex or a list of names")
        self.exclude_modules = _name_list("exclude_modules", self.exclude_modules, fail)
        self.modules_to_save = _name_list("modules_to_save", self.modules_to_save, fail)
        if not isinstance(self.competition, bool):
            fail(f"competition={self.competition!r}; must be true or false")
        if self.competition_norm not in COMPETITION_NORMS:
            fail(f"competition_norm={self.competition_norm!r}; allowed: {', '.join(COMPETITION_NORMS)}")
        if not isinstance(self.balance_weight, (int, float)) or self.balance_weight < 0:
            fail(f"balance_weight={self.balance_weight!r}; must be a number >= 0")
        self.balance_weight = float(self.balance_weight)
        if isinstance(self.num_token_groups, bool) or not isinstance(self.num_token_groups, int) or self.num_token_groups < 1:
            fail(f"num_token_groups={self.num_token_groups!r}; must be a positive integer")
        if not isinstance(self.group_routing, bool):
            fail(f"group_routing={self.group_routing!r}; must be true or false")
        if self.implementation not in IMPLEMENTATIONS:
            fail(f"implementation={self.implementation!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            fail(f"seed={self.seed!r}; must be an integer")

    # -- derived quantities -------------------------------------------------------------------
    @property
    def is_routed(self) -> bool:
        return self.method in ROUTED_METHODS

    @property
    def experts(self) -> int:
        """Number of experts actually used (1 for plain LoRA)."""
        return self.num_experts if self.is_routed else 1

    @property
    def expert_rank(self) -> int:
        """Rank each expert reads: r/k for TeamLoRA and MoELoRA, r for HydraLoRA and LoRA."""
        return self.r // self.num_experts if self.method in ("teamlora", "moelora") else self.r

    @property
    def scaling(self) -> float:
        """Each method's published scaling s: alpha / (r/k) for TeamLoRA, alpha / r otherwise."""
        return self.alpha / self.expert_rank if self.method == "teamlora" else self.alpha / self.r

    @property
    def effective_gain(self) -> float:
        """Gain g of the update g * B A x at uniform routing, with every expert's B equal where
        experts share one (HydraLoRA). LoRA: alpha/r. TeamLoRA (w_i = 1): alpha/(r/k) = k alpha/r.
        MoELoRA (w_i = 1/k): alpha/(k r). HydraLoRA (w_i = 1/k over k equal B's): alpha/r."""
        if self.method == "moelora":
            return self.scaling / self.num_experts
        return self.scaling

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["format"] = CONFIG_FORMAT
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        data.pop("format", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_FILE)
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike) -> "AdapterConfig":
        path = str(directory_or_file)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no adapter config at {path}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        if data.get("peft_type") is not None:
            raise ValueError(f"{path} is a peft adapter config; load it with peft's PeftModel.from_pretrained")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _name_list(key: str, value: Any, fail) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        fail(f"{key}={value!r}; must be a list of non-empty strings")
    return list(value)
