"""The training room: `RunConfig` (one YAML per run), the DeepSpeed engine around `MultimodalLM`,
the exact-loss step loop, checkpoints that always load, resume, and what a run records.

    from mm_teamlora.train import RunConfig, train
    result = train(RunConfig.from_yaml("data_configs/runs/demo_teamlora.yaml", ["optim.max_steps=20"]))

From a shell: `mm-teamlora train RUN.yaml [key=value ...]`, or under DeepSpeed's launcher
`deepspeed --num_gpus N --module mm_teamlora.train RUN.yaml [key=value ...]`.
"""

from .config import OptimConfig, RunConfig, RunConfigError
from .run import RunResult, train

__all__ = ["OptimConfig", "RunConfig", "RunConfigError", "RunResult", "train"]
