"""The training room on 2 CPU ranks (gloo) under ZeRO-2 and ZeRO-3, started by each launcher.

The mixture has one image record and one text-only record and each rank takes one sample per
step, so on every step rank 0 holds the image and rank 1 the text: under ZeRO-3 (with
`stage3_param_persistence_threshold: 0`, every parameter sharded) that made the ranks' collectives
differ before the text-only rank ran the tower on a blank image.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fixtures.data.helpers import llava, make_image, write_json
from mm_teamlora.adapters import AdapterConfig
from mm_teamlora.model import MultimodalConfig, MultimodalLM
from mm_teamlora.train.checkpoint import checkpoints
from mm_teamlora.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_mixed_zero3_run(root, adapter: dict, optim: dict, **top) -> dict:
    """Write in `root` the one-image + one-text-only mixture and a ZeRO-3 run of the tiny preset with
    every parameter sharded (`stage3_param_persistence_threshold: 0`); return the environment the
    ranks are started with (their own cache; no rank variables of an enclosing launcher)."""
    make_image(root / "red.png", color=(200, 30, 30))
    write_json(root / "mixed.json", [llava("img", "<image>\nWhat colour is it?", "Red, all of it.", image="red.png"),
                                     llava("txt", "Name a colour.", "Blue is a colour.")])
    (root / "mixed.yaml").write_text("template: chat\nsources:\n  - path: mixed.json\n    image_root: .\n")
    (root / "zero3.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    run = {"data": "mixed.yaml", "model": "tiny-random", "deepspeed": "zero3.json", "log_steps": 1,
           "tensorboard": False, "adapter": {"method": "teamlora", "r": 8, "num_experts": 4, **adapter},
           "optim": {"lr": 1e-2, "micro_batch_size": 1, "grad_accum": 1, "max_steps": 4, **optim}, **top}
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
            "MM_TEAMLORA_CACHE": str(root / "cache"), "MM_TEAMLORA_DIST_TIMEOUT": "60", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    env = write_mixed_zero3_run(root, {"dropout": 0.1, "group_routing": True}, {"warmup_ratio": 0.25}, save_steps=2)
    return root, env


def _run(command, env, **extra_env):
    done = subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True, timeout=600,
                          cwd=REPO, start_new_session=True)  # the kill hook ends its whole process group
    return done


def _torchrun(root, env, out, *args, **extra_env):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                 "mm_teamlora.train", str(root / "run.yaml"), f"output_dir={out}", *args], env, **extra_env)


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


def _tensors(folder):
    return MultimodalLM.from_pretrained(str(folder)).checkpoint_state_dict()


def test_zero3_two_ranks_one_text_only_trains_saves_whole_tensors_and_resumes(setup):
    root, env = setup
    full = _torchrun(root, env, root / "z3", "--overwrite")
    assert full.returncode == 0, full.stderr[-4000:]
    assert "global batch 2 = micro-batch 1 x accumulation 1 x 2 rank(s)" in full.stderr
    assert [os.path.basename(c) for c in checkpoints(root / "z3")] == ["checkpoint-000002", "checkpoint-000004"]
    records = read_metrics(str(root / "z3" / "metrics.jsonl"))
    assert all(r["tokens_by_group"]["image"] > 0 and r["tokens_by_group"]["text_only"] > 0 for r in records)

    # every saved tensor is whole (peft's save writes (0,) shards here) and equals the engine's own
    # consolidation of its ZeRO-3 shards: the live model
    folder = root / "z3" / "checkpoint-000004"
    saved = _tensors(folder)
    untrained = MultimodalLM.from_config(MultimodalConfig.preset("tiny-random"))
    untrained.add_adapters(AdapterConfig.load(str(folder)))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in untrained.checkpoint_state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    live = get_fp32_state_dict_from_zero_checkpoint(str(root / "z3" / "checkpoint-000004" / "trainer_state"),
                                                    tag="engine", exclude_frozen_parameters=True)
    assert set(live) == {k for k, v in saved.items() if isinstance(v, torch.nn.Parameter)}
    assert all(torch.equal(saved[k], live[k]) for k in live)

    # the same run under `mm-teamlora train --nproc 2` (DeepSpeed's launcher) killed (the whole launch,
    # SIGKILL) after step 3, then resumed from step 2: the same losses and tensors. DeepSpeed's CPU
    # allreduce segments in /dev/shm (never unlinked by DeepSpeed) are gone with the killed ranks.
    port = 29450 + os.getpid() % 200
    killed = _run([sys.executable, "-m", "mm_teamlora.cli", "train", str(root / "run.yaml"),
                   f"output_dir={root / 'z3_killed'}", "--overwrite", "--nproc", "2"], env,
                  MM_TEAMLORA_TEST_KILL_AT_STEP="3", MASTER_PORT=str(port))
    assert killed.returncode != 0
    assert [os.path.basename(c) for c in checkpoints(root / "z3_killed")] == ["checkpoint-000002"]
    assert "deepspeed_shm_comm_op" in killed.stdout + killed.stderr  # the CPU allreduce was in use
    segments = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_"
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(segments)]
    resumed = _run([sys.executable, "-m", "mm_teamlora.cli", "train", str(root / "run.yaml"),
                    f"output_dir={root / 'z3_killed'}", "--resume", "auto", "--nproc", "2"], env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "at step 2 of 4" in resumed.stderr
    assert _losses(root / "z3_killed") == _losses(root / "z3") and len(_losses(root / "z3")) == 4
    resumed_tensors = _tensors(root / "z3_killed" / "checkpoint-000004")
    assert all(torch.equal(resumed_tensors[k], saved[k]) for k in saved)

    # the same data under ZeRO-2, started by the CPU launch script: the same updated tensors
    script = _run(["bash", "scripts/finetune_teamlora_cpu.sh", "--overwrite", "save_steps=0"], env,
                  RUN_CONFIG=str(root / "run.yaml"), OUTPUT_DIR=str(root / "z2"), PYTHON=sys.executable,
                  MASTER_PORT=str(29650 + os.getpid() % 200))
    assert script.returncode == 0, script.stderr[-4000:]
    z2 = _tensors(root / "z2" / "checkpoint-000004")
    for key in saved:  # float32 sums in another order, amplified a little by Adam: 1e-4 of the scale
        torch.testing.assert_close(z2[key], saved[key], rtol=1e-3, atol=1e-4 * float(saved[key].abs().max()) + 1e-7)
    assert [round(l, 4) for _, l in _losses(root / "z2")] == [round(l, 4) for _, l in _losses(root / "z3")]


@pytest.mark.slow
def test_zero3_gradient_checkpointing_gives_the_same_training(setup):
    root, env = setup
    for flag in ("false", "true"):
        done = _torchrun(root, env, root / f"gc_{flag}", "--overwrite", f"gradient_checkpointing={flag}",
                         "adapter.dropout=0.0")
        assert done.returncode == 0, done.stderr[-4000:]
    plain, checkpointed = _tensors(root / "gc_false" / "checkpoint-000004"), _tensors(root / "gc_true" / "checkpoint-000004")
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)
    assert [l for _, l in _losses(root / "gc_true")] == pytest.approx([l for _, l in _losses(root / "gc_false")], rel=1e-6)


@pytest.mark.slow
def test_max_minutes_stops_both_ranks_at_the_same_step(setup):
    root, env = setup
    done = _torchrun(root, env, root / "minutes", "--overwrite", "optim.max_steps=40", "optim.max_minutes=0.000001")
    assert done.returncode == 0, done.stderr[-4000:]
    state = json.load(open(root / "minutes" / "run_state.json"))
    assert state["finished"] is False and state["step"] == 1
    assert "max_minutes=1e-06 reached: stopped at step 1 of 40" in done.stderr


@pytest.mark.slow
def test_the_deepspeed_launcher_starts_the_module_entry(setup):
    root, env = setup
    done = _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                 str(29850 + os.getpid() % 100), "--module", "mm_teamlora.train", str(root / "run.yaml"),
                 f"output_dir={root / 'ds'}", "optim.max_steps=2", "--overwrite"], env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(_losses(root / "ds")) == 2
