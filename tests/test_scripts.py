"""The launch scripts: `--help` lists their variables, and the command each would run (DRY_RUN=1)
builds a valid run config. The CPU script runs end to end in tests/test_train_distributed.py."""

import os
import re
import shlex
import subprocess

import pytest

from mm_teamlora.train import RunConfig, RunConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("finetune_teamlora.sh", "finetune_teamlora_cpu.sh", "pretrain_projector.sh", "eval_mmbench.sh")


def _script(name, *args, **env):
    return subprocess.run(["bash", os.path.join(REPO, "scripts", name), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd="/", timeout=60)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_variable_the_script_reads(name):
    done = _script(name, "--help")
    assert done.returncode == 0 and done.stdout.strip()
    text = open(os.path.join(REPO, "scripts", name)).read()
    read = set(re.findall(r"^([A-Z_]+)=\$\{", text, re.M)) - {"RUN"}
    assert read and all(var in done.stdout for var in read), read


def _launched_run_config(stdout: str) -> RunConfig:
    words = shlex.split(stdout.strip().splitlines()[0])
    module = words.index("mm_teamlora.train")
    config, rest = words[module + 1], words[module + 2:]
    return RunConfig.from_yaml(os.path.join(REPO, config), [w for w in rest if "=" in w and not w.startswith("-")])


def test_finetune_script_passes_the_papers_settings_as_a_valid_run():
    done = _script("finetune_teamlora.sh", DRY_RUN="1", NUM_GPUS="4", LORA_RANK="128", GLOBAL_BATCH="128",
                   MICRO_BATCH="16")
    assert done.returncode == 0, done.stderr
    run = _launched_run_config(done.stdout)
    assert (run.adapter.method, run.adapter.r, run.adapter.num_experts, run.adapter.alpha, run.adapter.dropout) == \
        ("teamlora", 128, 4, 32.0, 0.05)
    assert (run.optim.lr, run.optim.schedule, run.optim.warmup_ratio, run.precision) == (2e-4, "cosine", 0.03, "bf16")
    assert run.optim.global_batch_size(4) == 128 and run.deepspeed.endswith("scripts/zero3.json")
    assert os.path.isfile(run.deepspeed)
    assert run.model.endswith("runs/llava-pretrain")  # the stage-1 run, relative to the repository


def test_pretrain_script_trains_the_projector_alone():
    done = _script("pretrain_projector.sh", DRY_RUN="1", NUM_GPUS="8", LM_PATH="/models/lm", VISION_PATH="/models/clip")
    assert done.returncode == 0, done.stderr
    run = _launched_run_config(done.stdout)
    assert run.stage == "pretrain_projector" and run.optim.lr == 1e-3 and run.optim.global_batch_size(8) == 256
    assert run.model["language_model"] == "hf:/models/lm" and run.model["vision"]["path"] == "/models/clip"


def test_scripts_refuse_a_global_batch_that_does_not_divide():
    done = _script("finetune_teamlora.sh", DRY_RUN="1", NUM_GPUS="3")
    assert done.returncode == 2 and "not a multiple" in done.stderr


def test_eval_script_shards_over_processes_and_scores_them_together():
    done = _script("eval_mmbench.sh", DRY_RUN="1", NPROC="2", CHECKPOINT="/ckpt", DATA_TSV="/data/dev.tsv")
    assert done.returncode == 0, done.stderr
    launch, score = done.stdout.strip().splitlines()
    assert "--num-shards 0" in launch and "--nproc_per_node 2" in launch and "--circular" in launch
    assert "predictions.shard-0-of-2.tsv" in score and "predictions.shard-1-of-2.tsv" in score


def test_a_bad_override_from_a_script_fails_as_a_run_config_error():
    done = _script("finetune_teamlora_cpu.sh", "optim.learning_rate=1", DRY_RUN="1")
    with pytest.raises(RunConfigError, match="optim.learning_rate"):
        _launched_run_config(done.stdout)
