"""`scripts/gpu_smoke.sh`, checked as far as a machine without a GPU allows.

The script is meant to run unchanged on a lent GPU machine (no network, no weights, DeepSpeed
optional). Here: `--help` lists every variable it reads; without a GPU it says so, runs nothing,
leaves nothing behind and exits 3 (its documented skip); bad settings exit 2 before anything is
built; the model it builds has the embedded default's shapes (compared with the cached real
configs when they are there) and the preset's tower and projector; and a tiny CPU version of its
model stage (random 2-layer model, a few steps, save and reload) passes and reports through the
table, the RESULT line and `summary.json`; a spent TIME_BUDGET_S skips stages and exits 5. The
training-room stages on CPU ranks take over a minute here, so that test is `slow`.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from mm_teamlora.files import cache_root, is_complete
from mm_teamlora.model import MultimodalConfig
from mm_teamlora.train import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_smoke.sh")
TINY = {"GPU_SMOKE_ALLOW_CPU": "1", "GPU_SMOKE_TINY": "1", "STEPS": "4", "MICRO_BATCH": "2", "RECORDS": "16",
        "SEQ_TOKENS": "96"}


def smoke(*args, timeout=60, **env):
    """Run the script from / (it must find the repository itself), with this Python and no GPU."""
    full_env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full_env, cwd="/",
                          timeout=timeout)


def test_help_lists_every_variable_the_script_reads():
    done = smoke("--help")
    assert done.returncode == 0 and done.stdout.strip()
    read = set(re.findall(r"^([A-Z_0-9]+)=\$\{", open(SCRIPT).read(), re.M)) | {"DRY_RUN"}
    assert {"PYTHON", "STEPS", "METHODS", "GPU_SMOKE_ALLOW_CPU", "TIME_BUDGET_S"} <= read
    missing = [var for var in read if not re.search(rf"^\s+{var}\s", done.stdout, re.M)]
    assert not missing, missing
    assert "Exit status" in done.stdout and "3 no CUDA GPU" in done.stdout


def test_without_a_gpu_it_says_so_runs_nothing_and_exits_3(tmp_path):
    done = smoke(TMPDIR=str(tmp_path))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no CUDA GPU visible" in done.stdout and "nothing was run" in done.stdout
    assert "GPU_SMOKE_ALLOW_CPU=1" in done.stdout  # says how to run it anyway
    assert os.listdir(tmp_path) == []  # its temp folder is gone


def test_dry_run_prints_the_driver_command():
    done = smoke(DRY_RUN="1", STEPS="7")
    assert done.returncode == 0, done.stderr
    assert "gpu_smoke_driver.py" in done.stdout and "--steps 7" in done.stdout and "--precision bf16" in done.stdout


@pytest.mark.parametrize("env, message", [({"METHODS": "dora"}, "no .*demo_dora.yaml"),
                                          ({"STAGES": "model warp"}, "choose from model room zero2"),
                                          ({"STEPS": "1"}, "STEPS >= 2")])
def test_bad_settings_exit_2_before_anything_is_built(tmp_path, env, message):
    done = smoke(TMPDIR=str(tmp_path), **env)
    assert done.returncode == 2 and re.search(message, done.stdout), done.stdout + done.stderr


def test_the_smoke_model_has_the_embedded_defaults_shapes():
    done = smoke(PRINT_SHAPES="1")
    assert done.returncode == 0, done.stdout + done.stderr
    shapes = json.loads(done.stdout)
    preset = MultimodalConfig.preset("smollm2-dinov2-small")
    tower = {k: v for k, v in preset.vision.__dict__.items() if k not in ("kind", "path")}
    assert shapes["tower"] == tower and tower["pool_to"] == 64
    assert shapes["projector_type"] == preset.projector_type

    from mm_teamlora.model.convert import dinov2_onnx, smollm2_gguf

    folders = [os.path.join(cache_root(), m.CACHE_NAME) for m in (smollm2_gguf, dinov2_onnx)]
    if not all(is_complete(f) for f in folders):
        pytest.skip("the embedded default is not cached here: only the preset's parts were compared")
    for part, folder in zip(("language_model", "vision"), folders):
        with open(os.path.join(folder, "config.json")) as f:
            real = json.load(f)
        real.setdefault("rope_theta", real.get("rope_parameters", {}).get("rope_theta"))
        assert shapes[part]["class"] in real["architectures"]
        for key, value in shapes[part].items():
            if isinstance(value, float):  # the GGUF stores eps in float32
                assert real[key] == pytest.approx(value, rel=1e-6), (part, key)
            elif key != "class":
                assert real[key] == value, (part, key)


def test_a_tiny_cpu_model_stage_passes_and_reports(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    done = smoke(timeout=180, STAGES="model", METHODS="lora teamlora", WORK_DIR=str(work),
                 RESULTS_DIR=str(results), **TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^RESULT status=pass .*lora_model_tokens_per_s=\d+ .*teamlora_model_tokens_per_s=\d+",
                     done.stdout, re.M), done.stdout
    summary = json.loads((results / "summary.json").read_text())
    assert [(r["stage"], r["method"]) for r in summary["rows"]] == [("model", "lora"), ("model", "teamlora")]
    assert not summary["failed"] and not summary["skipped"]
    for row in summary["rows"]:
        assert row["checks"] and all(row["checks"].values())
        assert any(c.startswith("reloaded tensors equal") for c in row["checks"])
    assert (results / "gpu_smoke.log").read_text().count("RESULT status=pass") == 1

    lm = json.loads((work / "lm" / "config.json").read_text())
    assert (lm["hidden_size"], lm["num_hidden_layers"]) == (64, 2)  # tiny, random, built in the work dir
    records = json.loads((work / "records.json").read_text())
    assert len(records) == 16 and any("image" in r for r in records) and any("image" not in r for r in records)
    for method in ("lora", "teamlora"):
        run = RunConfig.from_yaml(str(work / f"run_{method}.yaml"))
        with open(os.path.join(REPO, "data_configs", "runs", f"demo_{method}.yaml")) as f:
            demo = yaml.safe_load(f)
        assert run.adapter.method == method and run.adapter.r == demo["adapter"]["r"]
        assert run.optim.max_steps == 4 and run.save_steps == 2 and run.precision == "fp32"
        assert run.model["language_model"] == "hf:" + str(work / "lm")


def test_a_spent_time_budget_skips_stages_and_exits_5(tmp_path):
    done = smoke(timeout=120, STAGES="model", METHODS="teamlora", TIME_BUDGET_S="0", TMPDIR=str(tmp_path), **TINY)
    assert done.returncode == 5, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[skipped] model teamlora (time budget)" in done.stdout
    assert re.search(r"^RESULT status=incomplete ", done.stdout, re.M)


@pytest.mark.slow
def test_a_tiny_cpu_training_room_run_checkpoints_resumes_and_runs_zero2(tmp_path):
    """The room stages on one CPU rank: ZeRO-0 with a checkpoint halfway, a resume from it that
    sees the same batches and ends on the same tensors (bit for bit on CPU), and ZeRO-2."""
    results = tmp_path / "results"
    done = smoke(timeout=600, STAGES="room zero2", METHODS="teamlora", RESULTS_DIR=str(results),
                 TMPDIR=str(tmp_path), **TINY)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["rows"]}
    assert set(rows) == {"room ZeRO-0", "room resumed", "room ZeRO-2"}
    assert all(all(r["checks"].values()) for r in rows.values())
    assert "bitwise equal" in rows["room resumed"]["note"]
    assert "max rel diff 0.0e+00" in rows["room ZeRO-2"]["note"]  # one rank: ZeRO-2 = ZeRO-0 on CPU
    assert re.search(r"^RESULT status=pass .*teamlora_zero2_tokens_per_s=\d+ teamlora_zero2_peak_mib=\d+",
                     done.stdout, re.M)
