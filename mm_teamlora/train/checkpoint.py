"""Checkpoints that always load, and resuming from them.

A checkpoint is one self-describing folder, loadable on its own by `MultimodalLM.from_pretrained`
and `mm-teamlora eval --model`:

    RUN/checkpoint-000200/
      mm_config.json, projector.safetensors, adapter_config.json, adapter_model.safetensors
      trainer_state.json       step, epoch, whether the run finished there, the run's metrics so far
      trainer_state/           the DeepSpeed engine (optimizer, scheduler; trainable tensors only:
                               `exclude_frozen_parameters`), the sampler position, every rank's RNG
    RUN/latest                 the name of the newest complete checkpoint

It is written under `.checkpoint-000200.partial` by all ranks (ZeRO-3 tensors are gathered first,
rank 0 writes the model files), and rank 0 renames it into place after a barrier: a folder named
`checkpoint-*` is always whole. Then `latest` moves (itself written whole), and checkpoints beyond
the newest `save_total_limit` are removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from ..files import atomic_write_text
from ..model import MultimodalLM

LATEST = "latest"
STATE_FILE = "trainer_state.json"
ENGINE_DIR, ENGINE_TAG = "trainer_state", "engine"
NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def gathered_state(engine, model: MultimodalLM) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of the checkpoint tensors on rank 0 (None elsewhere). Under ZeRO-3 a
    parameter is a shard until gathered; this is a collective call for every rank."""
    import deepspeed

    state = model.checkpoint_state_dict()
    rank = torch.distributed.get_rank()
    params = [t for t in state.values() if isinstance(t, torch.nn.Parameter)]
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()} if rank == 0 else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, model: MultimodalLM, run_dir: str, step: int, state: dict, keep: int) -> str:
    """Write the checkpoint of `step` (every rank calls this); returns its folder."""
    rank, dist = torch.distributed.get_rank(), torch.distributed
    name = checkpoint_name(step)
    final, partial = os.path.join(run_dir, name), os.path.join(run_dir, f".{name}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    tensors = gathered_state(engine, model)
    if rank == 0:
        model.save_pretrained(partial, state_dict=tensors)
    engine.save_checkpoint(os.path.join(partial, ENGINE_DIR), tag=ENGINE_TAG, client_state={"trainer": state},
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), os.path.join(partial, ENGINE_DIR, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        atomic_write_text(os.path.join(partial, STATE_FILE), json.dumps(state, indent=1) + "\n")
        if os.path.isdir(final):  # the same step saved again (a resumed run that stopped there)
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(os.path.join(run_dir, LATEST), name + "\n")
        prune(run_dir, keep)
    dist.barrier()
    return final


def checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := NAME.match(n))
             and os.path.isfile(os.path.join(run_dir, n, STATE_FILE))]
    return [os.path.join(run_dir, n) for _, n in sorted(found)]


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint: the `latest` pointer, else the highest step."""
    pointer = os.path.join(run_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            folder = os.path.join(run_dir, f.read().strip())
        if os.path.isfile(os.path.join(folder, STATE_FILE)):
            return folder
    found = checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (0 keeps all) and leftovers of interrupted saves."""
    for name in os.listdir(run_dir):
        if name.startswith(".checkpoint-") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    if keep:
        for folder in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(folder, ignore_errors=True)


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load(engine, folder: str) -> dict:
    """Restore the engine, this rank's RNG, and return the trainer state saved with them."""
    rank = torch.distributed.get_rank()
    rng_file = os.path.join(folder, ENGINE_DIR, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise FileNotFoundError(f"{folder} holds no state for rank {rank}: resume with the number of ranks it was "
                                "saved with")
    path, client = engine.load_checkpoint(os.path.join(folder, ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed found no engine state under {ENGINE_DIR}/{ENGINE_TAG}")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client["trainer"]
