"""`mm-teamlora train RUN.yaml ... --nproc N`: check the run here, then start DeepSpeed's launcher.

With N = 1 the run trains in this process (`train.train`). With N > 1 the run is checked first (files, ZeRO JSON,
batch sizes against N ranks, the run folder), so a bad configuration fails before any process or
process group starts; then `deepspeed --num_gpus N --module mm_teamlora.train ...` runs it, on the
GPUs of this node or, without any, on N CPU ranks (gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys

from .config import RunConfig


def launch(config_path: str, overrides: list[str], nproc: int, resume: str | None = None,
           overwrite: bool = False) -> int:
    """Check the run for `nproc` ranks, then train it under DeepSpeed's launcher; its exit code."""
    from .engine import free_port
    from .run import preflight

    if nproc < 2:
        raise ValueError(f"--nproc {nproc}: the launcher starts 2 or more ranks (1 trains in this process)")
    preflight(RunConfig.from_yaml(config_path, overrides), nproc, resume, overwrite)
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # N CPU ranks share the cores: without this each would start a thread per core (torchrun
        # sets 1, and a run should not change with the launcher)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", env.get("MASTER_PORT", str(free_port())), "--module", "mm_teamlora.train",
               os.path.abspath(config_path), *overrides]
    command += ["--resume", resume] if resume else []
    command += ["--overwrite"] if overwrite else []
    return subprocess.call(command, env=env)
