"""The driver of scripts/gpu_smoke.sh (the script's header says what it checks). Progress lines,
then a table and a RESULT line; exit status as the header says. Run through the script, which passes
every setting and the work folder."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

PASS, FAIL, BAD, NO_GPU, MISSING, INCOMPLETE = 0, 1, 2, 3, 4, 5
CORE_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "yaml", "PIL", "numpy", "tqdm", "datasets",
                "pyarrow")
ROOM_MODULES = ("deepspeed", "matplotlib")  # the training room needs these too (its loss curve: matplotlib)
STAGES = ("model", "room", "zero2")
# The embedded default's shapes (the config.json of SmolLM2-135M-Instruct and of DINOv2 ViT-S/14 as
# the project converts it, 224 px); tests/test_gpu_smoke.py compares them with the cached originals.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                    image_size=224, num_channels=3, qkv_bias=True, layerscale_value=1.0, hidden_act="gelu",
                    layer_norm_eps=1e-6, use_swiglu_ffn=False, use_mask_token=False)
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                   image_size=56, qkv_bias=True, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6)
TINY_POOL_TO = 4  # the tiny tower's 4 x 4 patch grid pooled to 2 x 2
WORDS = ("the a quick brown fox jumps over lazy dog what is shown in image answer with option letter red blue "
         "green circle square triangle white background describe picture how many objects are there which "
         "color shape count items photo digits numbers question").split()
LINES: list[str] = []  # everything this driver printed, for RESULTS_DIR


def say(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--methods", required=True)
    p.add_argument("--stages", required=True)
    for name, kind in (("steps", int), ("micro-batch", int), ("seq-tokens", int), ("records", int),
                       ("num-gpus", int), ("resume-rtol", float), ("time-budget", float), ("allow-cpu", int),
                       ("tiny", int), ("print-shapes", int)):
        p.add_argument("--" + name, type=kind, required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--results-dir", default="")
    a = p.parse_args(argv)
    a.methods, a.stages = a.methods.split(), a.stages.split()
    return a


def settings_problem(a) -> str | None:
    for method in a.methods:
        if not os.path.isfile(demo_run(a, method)):
            return f"METHODS: no {demo_run(a, method)} for {method!r}"
    if not a.methods or not a.stages or set(a.stages) - set(STAGES):
        return f"STAGES={' '.join(a.stages)!r}: choose from {' '.join(STAGES)}; METHODS must not be empty"
    if a.steps < 2 or a.micro_batch < 1 or a.records < a.micro_batch or a.seq_tokens < 32:
        return "need STEPS >= 2 (a checkpoint halfway), MICRO_BATCH >= 1, RECORDS >= MICRO_BATCH, SEQ_TOKENS >= 32"
    if a.precision not in ("bf16", "fp32"):
        return f"PRECISION={a.precision!r}: bf16 or fp32"
    return None


def demo_run(a, method: str) -> str:
    return os.path.join(a.repo, "data_configs", "runs", f"demo_{method}.yaml")


# -- the model and the data -------------------------------------------------------------------
def shapes(a) -> dict:
    """What the smoke model is made of: LM and vision configs, the tower options and the projector
    (taken from the preset `smollm2-dinov2-small`, only the tower's folder replaced)."""
    from mm_teamlora.model import MultimodalConfig

    preset = MultimodalConfig.preset("smollm2-dinov2-small")
    tower = {k: v for k, v in dataclasses.asdict(preset.vision).items() if k not in ("kind", "path")}
    if a.tiny:
        tower["pool_to"] = TINY_POOL_TO
    return {"language_model": {"class": "LlamaForCausalLM", **(TINY_LM if a.tiny else SMOLLM2_135M)},
            "vision": {"class": "Dinov2Model", **(TINY_VISION if a.tiny else DINOV2_SMALL)},
            "tower": tower, "projector_type": preset.projector_type}


def build_folders(a, work: str, device) -> dict:
    """Random-weight LM and vision folders (seeded) and the run config's `model` mapping."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from mm_teamlora.model.convert.dinov2_onnx import image_processor
    from mm_teamlora.tiny_tokenizer import tiny_tokenizer

    spec, tokenizer = shapes(a), tiny_tokenizer()
    lm_dir, vision_dir = os.path.join(work, "lm"), os.path.join(work, "vision")
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    lm_fields = {k: v for k, v in spec["language_model"].items() if k != "class"}
    lm_fields.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(**lm_fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: seconds, not a minute, for 135M
        lm = LlamaForCausalLM(config)
    lm.to(dtype).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    del lm
    vision_fields = {k: v for k, v in spec["vision"].items() if k != "class"}
    Dinov2Model(Dinov2Config(**vision_fields)).to(dtype).save_pretrained(vision_dir)
    image_processor(vision_fields["image_size"]).save_pretrained(vision_dir)
    return {"language_model": "hf:" + lm_dir, "vision": {"kind": "hf", "path": vision_dir, **spec["tower"]},
            "projector_type": spec["projector_type"]}


def write_data(a, work: str, image_tokens: int) -> str:
    """`RECORDS` LLaVA-form records (three quarters with one image out of a pool of 32 noise
    images, lengths 40-90% of SEQ_TOKENS) and the mixture YAML naming them."""
    import numpy as np
    import yaml
    from PIL import Image

    from mm_teamlora.tiny_tokenizer import tiny_tokenizer

    rng, pixels = random.Random(0), np.random.default_rng(0)
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    pool = []
    for i in range(32):
        path = f"images/{i:02d}.png"
        size = (int(pixels.integers(24, 96)), int(pixels.integers(24, 96)))
        Image.fromarray(pixels.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(work, path))
        pool.append(path)
    tokenizer = tiny_tokenizer()
    sample = " ".join(WORDS * 4)
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / (len(WORDS) * 4)
    records = []
    for k in range(a.records):
        image = rng.random() < 0.75
        budget = a.seq_tokens * rng.uniform(0.4, 0.9) - (image_tokens if image else 0) - 16  # template
        n = max(4, int(budget / per_word))
        question, answer = (" ".join(rng.choice(WORDS) for _ in range(m)) for m in (max(2, n * 2 // 5), n - n * 2 // 5))
        record = {"id": f"gen-{k}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                                       {"from": "gpt", "value": answer}]}
        if image:
            record["image"] = rng.choice(pool)
        records.append(record)
    with open(os.path.join(work, "records.json"), "w", encoding="utf-8") as f:
        json.dump(records, f)
    mixture = {"name": "gpu-smoke", "template": "chat", "max_length": a.seq_tokens, "seed": 0, "on_error": "raise",
               "truncation": "tail", "sources": [{"name": "generated", "path": os.path.join(work, "records.json"),
                                                  "format": "llava", "image_root": work}]}
    path = os.path.join(work, "mixture.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(mixture, f, sort_keys=False)
    return path


def write_run(a, work: str, method: str, model_spec: dict, mixture: str) -> str:
    """One run YAML: the demo run's adapter and learning rates, the smoke test's sizes."""
    import yaml

    from mm_teamlora.train import RunConfig

    with open(demo_run(a, method), encoding="utf-8") as f:
        demo = yaml.safe_load(f)
    optim = {k: demo["optim"][k] for k in ("lr", "projector_lr", "warmup_ratio", "schedule") if k in demo["optim"]}
    run = {"model": model_spec, "data": mixture, "output_dir": os.path.join(work, "runs", method),
           "adapter": demo["adapter"], "precision": a.precision, "deepspeed": 0,
           "optim": {**optim, "micro_batch_size": a.micro_batch, "grad_accum": 1, "max_steps": a.steps},
           "save_steps": a.steps // 2, "save_total_limit": 0, "log_steps": log_steps(a), "tensorboard": False,
           "val_samples": 0, "seed": 0}
    path = os.path.join(work, f"run_{method}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(run, f, sort_keys=False)
    RunConfig.from_yaml(path)  # a bad run config fails here, not in a subprocess
    return path


def log_steps(a) -> int:
    return max(1, a.steps // 10)


# -- stage "model": the model alone, no DeepSpeed -----------------------------------------------
def model_stage(a, work: str, method: str, run_yaml: str, device) -> dict:
    import torch

    from mm_teamlora.adapters import collect_aux_loss
    from mm_teamlora.data import DataCollator, build_dataset
    from mm_teamlora.model import MultimodalLM
    from mm_teamlora.train import RunConfig
    from mm_teamlora.train.data import BatchStream, split_validation
    from mm_teamlora.train.engine import build_model, build_optimizer
    from mm_teamlora.train.loop import supervised_tokens, to_device

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run = RunConfig.from_yaml(run_yaml)
    torch.manual_seed(run.seed)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(run).to(device).train()
    view, _ = split_validation(build_dataset(run.data, **model.data_inputs()), 0, run.seed)
    collator = DataCollator.from_tokenizer(model.tokenizer)
    batches = iter(BatchStream(view, collator, run.optim.micro_batch_size, 0, 1, run.seed))
    optimizer, schedule = build_optimizer(model, run, a.steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    warm = min(3, a.steps - 1)  # steps before the clock starts (kernel selection, allocator growth)
    losses, tokens, started = [], 0, time.perf_counter()
    for step in range(a.steps):
        if step == warm:
            sync()
            tokens, started = 0, time.perf_counter()
        batch = next(batches)
        n = max(supervised_tokens(batch), 1)
        out = model(**to_device(batch, device), supervised_only=True)
        (out.loss_sum / n + collect_aux_loss(model).to(out.loss_sum)).backward()
        if run.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, run.optim.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss_sum.detach()) / n)
        tokens += int(out.group_tokens.sum())
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    folder = os.path.join(work, "model-stage", method)
    model.save_pretrained(folder)
    reloaded = MultimodalLM.from_pretrained(folder).to(device)
    saved, loaded = model.checkpoint_state_dict(), reloaded.checkpoint_state_dict()
    same_tensors = set(saved) == set(loaded) and all(torch.equal(saved[k].detach(), loaded[k].detach()) for k in saved)
    probe = to_device(collator([view[i] for i in range(min(len(view), a.micro_batch))]), device)
    with torch.no_grad():
        before = float(model.eval()(**probe, supervised_only=True).loss_sum)
        after = float(reloaded.eval()(**probe, supervised_only=True).loss_sum)
    reload_diff = abs(before - after) / max(abs(before), 1e-12)
    checks = {"finite losses": all(math.isfinite(x) for x in losses),
              "reloaded tensors equal": same_tensors,
              f"reloaded loss equal (rel diff {reload_diff:.1e} <= 1e-3)": reload_diff <= 1e-3}
    del model, reloaded, optimizer, schedule, saved, loaded, probe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"stage": "model", "method": method, "steps": a.steps, "tokens_per_s": tokens / max(seconds, 1e-9),
            "peak_mib": peak, "loss_first": losses[0], "loss_last": losses[-1], "checks": checks}


# -- stages "room" and "zero2": the training room in subprocesses ---------------------------------
def subprocess_env(a, work: str) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(p for p in (a.repo, env.get("PYTHONPATH")) if p),
                "MM_TEAMLORA_CACHE": os.path.join(work, "cache"), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def room_available(a, env) -> str | None:
    """None when the training room can run here, else why not."""
    missing = [m for m in ROOM_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    done = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"], env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"`import deepspeed` fails: {last}"
    say(f"deepspeed {(done.stdout.strip().splitlines() or ['?'])[-1]}")
    return None


def train_command(a, run_yaml: str, out: str, zero: int, ranks: int, resume: str | None = None) -> list[str]:
    overrides = [f"output_dir={out}", f"deepspeed={zero}"]
    if ranks > 1:  # the project's launcher: checks the run for N ranks, then DeepSpeed's launcher
        return [sys.executable, "-m", "mm_teamlora.cli", "train", run_yaml, *overrides, "--nproc", str(ranks),
                "--overwrite"]
    return [sys.executable, "-m", "mm_teamlora.train", run_yaml, *overrides,
            *(["--resume", resume] if resume else ["--overwrite"])]


def run_logged(name: str, command: list[str], env: dict, log_path: str, timeout: float) -> tuple[int | str, float]:
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the run's own process group (launcher and ranks)
            process.wait()
            rc = "timeout"
    seconds = time.monotonic() - started
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-40:]
        say(f"  {name} failed ({rc}); last lines of {log_path}:")
        for line in tail:
            say("    " + line)
    return rc, seconds


def figures(run_dir: str) -> tuple[list[dict], float | None, float | None]:
    """(training records, median tokens/s of the logged windows after the first, peak MiB)."""
    from mm_teamlora.train.metrics import read_metrics

    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") != "val"]
    windows = [r["tokens_per_s"] for r in records]
    windows = windows[1:] or windows
    peak = max((r["peak_mem_mb"] for r in records), default=None)
    return records, (statistics.median(windows) if windows else None), peak


def by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records}


def compare_runs(reference: list[dict], other: list[dict]) -> tuple[int, bool, float]:
    """(common logged steps, the same batches at each: supervised tokens and tokens per group,
    largest relative loss difference)."""
    ref, oth = by_step(reference), by_step(other)
    common = sorted(set(ref) & set(oth))
    same = all(ref[s]["supervised_tokens"] == oth[s]["supervised_tokens"]
               and ref[s]["tokens_by_group"] == oth[s]["tokens_by_group"] for s in common)
    diff = max((abs(ref[s]["loss"] - oth[s]["loss"]) / max(abs(ref[s]["loss"]), 1e-12) for s in common), default=math.inf)
    return len(common), same, diff


def tensor_diff(folder_a: str, folder_b: str) -> float:
    """Largest |a - b| over the adapter and projector tensors of two checkpoints."""
    from safetensors.torch import load_file

    worst = 0.0
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        pa, pb = os.path.join(folder_a, name), os.path.join(folder_b, name)
        if not os.path.isfile(pa):
            continue
        ta, tb = load_file(pa), load_file(pb)
        if set(ta) != set(tb):
            return math.inf
        worst = max([worst] + [float((ta[k].double() - tb[k].double()).abs().max()) for k in ta])
    return worst


def room_row(stage, method, steps, records, tokens_per_s, peak, checks, note="") -> dict:
    losses = [r["loss"] for r in records]
    checks = {"finite losses": bool(losses) and all(math.isfinite(x) for x in losses), **checks}
    return {"stage": stage, "method": method, "steps": steps, "tokens_per_s": tokens_per_s, "peak_mib": peak,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "checks": checks, "note": note}


def checkpoint(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:06d}")


# -- the whole smoke test -----------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse(argv)
    clock = time.monotonic()
    missing = [m for m in CORE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        say(f"gpu_smoke: {sys.executable} lacks {', '.join(missing)}; nothing was run. Use a Python with the "
            "project's dependencies (PYTHON=...), e.g. one whose wheels were installed offline with "
            "`pip install --no-index --find-links WHEELS ...`")
        return MISSING
    sys.path.insert(0, a.repo)
    problem = settings_problem(a)
    if problem:
        say(f"gpu_smoke: bad settings: {problem}")
        return BAD
    if a.print_shapes:
        print(json.dumps(shapes(a), indent=1))
        return PASS
    import torch
    import transformers

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not a.allow_cpu:
        say(f"gpu_smoke: SKIPPED: no CUDA GPU visible to torch {torch.__version__} (CUDA build "
            f"{torch.version.cuda}); nothing was run. This smoke test is for a GPU machine; "
            "GPU_SMOKE_ALLOW_CPU=1 (with GPU_SMOKE_TINY=1) runs it on the CPU.")
        return NO_GPU
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    ranks = (a.num_gpus or gpus) if gpus else 1
    if gpus and ranks > gpus:
        say(f"gpu_smoke: bad settings: NUM_GPUS={a.num_gpus} but {gpus} GPU(s) are visible")
        return BAD
    if a.precision == "bf16" and gpus and not torch.cuda.is_bf16_supported():
        say(f"gpu_smoke: bad settings: {torch.cuda.get_device_name(0)} has no bf16; PRECISION=fp32")
        return BAD
    work = os.path.abspath(a.work)
    os.environ["MM_TEAMLORA_CACHE"] = os.path.join(work, "cache")  # tokenised data stays in WORK_DIR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    say(f"gpu_smoke: {name} x{gpus or 1}; python {sys.version.split()[0]}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), transformers {transformers.__version__}; {a.precision}; "
        f"{'tiny' if a.tiny else 'SmolLM2-135M + DINOv2-S'} shapes, random weights; work dir {work}")
    env = subprocess_env(a, work)
    room_missing = room_available(a, env) if {"room", "zero2"} & set(a.stages) else None
    if room_missing:
        say(f"training room SKIPPED: {room_missing}")

    model_spec = build_folders(a, work, device)
    from mm_teamlora.model.vision import VisionTowerConfig

    tower = VisionTowerConfig(**model_spec["vision"])
    image_tokens = tower.pool_to or (shapes(a)["vision"]["image_size"] // shapes(a)["vision"]["patch_size"]) ** 2
    mixture = write_data(a, work, image_tokens)
    runs = {m: write_run(a, work, m, model_spec, mixture) for m in a.methods}
    say(f"built the model folders, {a.records} records and {len(runs)} run config(s) in {time.monotonic() - clock:.0f} s")

    rows, skipped, logs = [], [], []
    half = a.steps // 2
    last_room_s = 0.0

    def time_left(expected: float = 0.0) -> bool:
        return time.monotonic() - clock + expected <= a.time_budget

    def room(stage: str, method: str, command: list[str], out: str):
        """Run one training-room command; None when the time budget skips it, else (exit 0,
        training records, tokens/s, peak MiB)."""
        nonlocal last_room_s
        if not time_left(last_room_s):
            skipped.append(f"{stage} {method} (time budget)")
            say(f"{stage} {method}: SKIPPED, TIME_BUDGET_S={a.time_budget:g} would be exceeded")
            return None
        log_path = os.path.join(work, f"{stage}-{method}.log")
        logs.append(log_path)
        timeout = max(60.0, a.time_budget + 30 - (time.monotonic() - clock))
        rc, seconds = run_logged(f"{stage} {method}", command, env, log_path, timeout)
        last_room_s = seconds
        say(f"{stage} {method}: exit {rc} in {seconds:.0f} s")
        return (rc == 0, *figures(out))

    # stage by stage (every method's model stage, then every method's room runs, then ZeRO-2): the
    # methods of a stage run back to back, and a time budget that runs out cuts the last stage
    for method in a.methods if "model" in a.stages else ():
        if not time_left():
            skipped.append(f"model {method} (time budget)")
            continue
        say(f"model {method}: {a.steps} steps of the model alone ...")
        rows.append(model_stage(a, work, method, runs[method], device))
        say(f"model {method}: {rows[-1]['tokens_per_s']:.0f} tokens/s")
    if room_missing:
        skipped += [f"{s} {m} ({room_missing})" for s in ("room", "zero2") if s in a.stages for m in a.methods]
    zero0_records = {}  # method -> the ZeRO-0 run's records, for the ZeRO-2 comparison
    for method in a.methods if "room" in a.stages and not room_missing else ():
        run_a = os.path.join(work, "runs", f"{method}-zero0")
        done_a = room("room", method, train_command(a, runs[method], run_a, 0, 1), run_a)
        if done_a is None:
            continue
        ok, records, tps, peak = done_a
        zero0_records[method] = records
        saved = all(os.path.isfile(os.path.join(checkpoint(run_a, s), "trainer_state.json")) for s in (half, a.steps))
        rows.append(room_row("room ZeRO-0", method, a.steps, records, tps, peak,
                             {"exit 0": ok, f"checkpoints at steps {half} and {a.steps}": saved}))
        run_b, resume = os.path.join(work, "runs", f"{method}-resumed"), checkpoint(run_a, half)
        if not os.path.isdir(resume):
            continue
        done_b = room("resume", method, train_command(a, runs[method], run_b, 0, 1, resume=resume), run_b)
        if done_b is None:
            continue
        ok_b, records_b, tps_b, peak_b = done_b
        common, same, diff = compare_runs(records, records_b)
        worst = tensor_diff(checkpoint(run_a, a.steps), checkpoint(run_b, a.steps)) if ok and ok_b else math.inf
        rows.append(room_row("room resumed", method, a.steps - half, records_b, tps_b, peak_b, {
            "exit 0": ok_b, f"same batches as the uninterrupted run at {common} logged steps": same and common > 0,
            f"losses within {a.resume_rtol:g} of it (max rel diff {diff:.1e})": diff <= a.resume_rtol},
            note=f"final tensors max |diff| {worst:.1e}" + (" (bitwise equal)" if worst == 0 else "")))
    for method in a.methods if "zero2" in a.stages and not room_missing else ():
        run_z = os.path.join(work, "runs", f"{method}-zero2")
        done_z = room("zero2", method, train_command(a, runs[method], run_z, 2, ranks), run_z)
        if done_z is None:
            continue
        ok, records_z, tps, peak = done_z
        checks, note = {"exit 0": ok}, f"{ranks} rank(s)"
        if zero0_records.get(method) and ranks == 1:  # one rank: the ZeRO-0 run's batches
            common, same, diff = compare_runs(zero0_records[method], records_z)
            checks[f"same batches as ZeRO-0 at {common} logged steps"] = same and common > 0
            note += f"; loss vs ZeRO-0 max rel diff {diff:.1e}"
        rows.append(room_row("room ZeRO-2", method, a.steps, records_z, tps, peak, checks, note))

    failed = [(r["stage"], r["method"], c) for r in rows for c, ok in r["checks"].items() if not ok]
    total_s = time.monotonic() - clock
    report(a, rows, failed, skipped, name, total_s)
    if a.results_dir:
        save_results(a, rows, failed, skipped, logs, name, total_s)
    return FAIL if failed else INCOMPLETE if skipped else PASS


def report(a, rows, failed, skipped, device_name, total_s) -> None:
    say()
    say(f"{'stage':<14} {'method':<10} {'steps':>5} {'tokens/s':>10} {'peak MiB':>9} {'loss first -> last':>19}  checks")
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        loss = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r["loss_first"] is not None else "-")
        bad = [c for c, ok in r["checks"].items() if not ok]
        say(f"{r['stage']:<14} {r['method']:<10} {r['steps']:>5} {tps:>10} {peak:>9} {loss:>19}  "
            f"{'FAILED: ' + '; '.join(bad) if bad else 'ok'}{'  ' + r['note'] if r.get('note') else ''}")
    for r in rows:
        for check, ok in r["checks"].items():
            say(f"  [{'ok' if ok else 'FAILED'}] {r['stage']} {r['method']}: {check}")
    for s in skipped:
        say(f"  [skipped] {s}")
    status = "fail" if failed else "incomplete" if skipped else "pass"
    fields = [f"status={status}", f"device={device_name.replace(' ', '_')}", f"precision={a.precision}",
              f"seconds={total_s:.0f}"]
    for r in rows:
        key = f"{r['method']}_{r['stage'].split()[-1].replace('-', '').lower()}"
        if r["tokens_per_s"] is not None:
            fields.append(f"{key}_tokens_per_s={r['tokens_per_s']:.0f}")
        if r["peak_mib"] is not None:
            fields.append(f"{key}_peak_mib={r['peak_mib']:.0f}")
    say("RESULT " + " ".join(fields))


def save_results(a, rows, failed, skipped, logs, device_name, total_s) -> None:
    os.makedirs(a.results_dir, exist_ok=True)
    with open(os.path.join(a.results_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"device": device_name, "seconds": total_s, "rows": rows, "failed": failed, "skipped": skipped,
                   "settings": vars(a)}, f, indent=1, default=str)
    with open(os.path.join(a.results_dir, "gpu_smoke.log"), "w", encoding="utf-8") as f:
        f.write("\n".join(LINES) + "\n")
        for path in logs:
            f.write(f"\n===== {os.path.basename(path)} =====\n")
            with open(path, encoding="utf-8", errors="replace") as g:
                shutil.copyfileobj(g, f)


if __name__ == "__main__":
    sys.exit(main())
