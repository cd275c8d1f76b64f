"""Training throughput, side by side in one run (not a test): our training room vs HF Trainer + peft.

Ours: the real `train` code (`mm_teamlora.train.__main__.main` under DeepSpeed's launcher, 2 CPU ranks,
ZeRO-2, as `mm-teamlora train RUN --nproc 2`) on data_configs/runs/demo_teamlora.yaml (the embedded
default, 16 tokens per image, the demo mixture), no validation. Methods at TeamLoRA r64 k4's trainable
parameters (adapters/matching.py): LoRA r66, MoELoRA r64 (published loop form, and fused), HydraLoRA r25,
TeamLoRA r64; with both levers and without each: `full-logits` (`supervised_logits: false`: every
position's logits, then the kept ones) and
`no-cache` (`feature_cache: false`; with it, an unmeasured run of the same steps stores the features first).
Peer: `transformers.Trainer` + peft LoRA (all-linear, our LoRA's rank), the DeepSpeed config our engine
builds, the same LM and text-only records (runs/demo-data/binding.yaml through our data code), micro-batch
4, our collator's right padding. Both sides train on identical batches: the peer's loader yields, on each
rank, the batches our sampler plans for that rank (modality- and length-grouped, as its own
`group_by_length` would be, but the same ones), so a difference in tokens/s is the step's cost, not the
batches' lengths (long batches run faster per token). Asserted: the peer's ranks train on different
records at every step, both sides on the same global batch, and every rank's step holds the same
non-padding tokens on both sides.

tokens/s is the project's (non-padding LM tokens, image tokens included, summed over ranks) over the
steps after --warmup, per second of rank 0's wall clock from the end of the last warm-up step to the end
of the last step: on both sides everything between optimizer steps counts (data, logging at the run
YAML's `log_steps` with its routing record, collectives). Peak memory is each rank's peak RSS. Achieved FLOP/s,
matmul weights only (no attention scores, tower or projector), T non-padding tokens:
    4 P_frozen T + 4 P_head T_head + 6 P_adapter T
(2 P T forward + 2 P T input gradients through frozen layers; T_head = supervised positions with
logits_to_keep, T without; adapters add weight gradients, P_adapter = matching.parameter_count), as a
fraction of this machine's fp32 GEMM FLOP/s (2048^3 torch.mm on every core, best of start and end).

    .venv/bin/python bench/train_throughput.py [--steps 25] [--warmup 3] [--methods ...] [--quick]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_RUN = os.path.join(ROOT, "data_configs/runs/demo_teamlora.yaml")
TEXT_DATA = os.path.join(ROOT, "runs/demo-data/binding.yaml")
OUT = os.path.join(ROOT, "runs/bench-throughput")
METHODS = {"lora": ("lora", "fused"), "moelora-loop": ("moelora", "loop"), "moelora-fused": ("moelora", "fused"),
           "hydralora": ("hydralora", "fused"), "teamlora": ("teamlora", "fused")}
LEVERS = {"both": (True, True), "full-logits": (False, True), "no-cache": (True, False)}  # (logits_to_keep, cache)
NPROC = 2


# -- inside a rank (started by DeepSpeed's launcher with `_rank SPEC.json`) ---------------------
def _rank_ours(spec: dict) -> tuple[int, dict]:
    from mm_teamlora.train import run as run_module
    from mm_teamlora.train.__main__ import main

    steps, inner = [], run_module.train_step

    def counted(*args, **kwargs):  # this rank's tokens, supervised tokens and cache use, and when the step ended
        stats, routing = inner(*args, **kwargs)
        steps.append({"end": time.perf_counter(), "tokens": stats.tokens, "supervised": stats.supervised,
                      "hits": stats.cache_hits, "misses": stats.cache_misses})
        return stats, routing

    run_module.train_step = counted
    return main([BASE_RUN, *spec["overrides"], "--overwrite"]), {"steps": steps}


def _rank_peer(spec: dict) -> tuple[int, dict]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from mm_teamlora.data import DataCollator, GroupedBatchSampler, build_dataset
    from mm_teamlora.model import zoo
    from mm_teamlora.train import RunConfig
    from mm_teamlora.train.data import split_validation
    from mm_teamlora.train.engine import deepspeed_config, model_config

    run = RunConfig.from_yaml(BASE_RUN, spec["overrides"])
    cfg, _ = model_config(run)
    lm, tokenizer = zoo.preset_language_model(cfg.lm_path, cfg.torch_dtype)
    records = build_dataset(run.data, tokenizer=tokenizer, image_token_count=spec["image_tokens"])  # ours' cache
    collate = DataCollator.from_tokenizer(tokenizer)
    a, o = run.adapter, run.optim
    model = get_peft_model(lm, LoraConfig(r=spec["r"], lora_alpha=a.alpha, lora_dropout=a.dropout,
                                          target_modules="all-linear", task_type="CAUSAL_LM"))

    items = [{"input_ids": records[i]["input_ids"], "labels": records[i]["labels"], "idx": i} for i in range(len(records))]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    # our run's batches for this rank (train.run: val_samples=0 keeps every record, in order)
    train_view, _ = split_validation(records, run.val_samples, run.seed)
    assert len(train_view) == len(records), "the bench runs without held-out records"
    plan = GroupedBatchSampler.from_dataset(train_view, batch_size=o.micro_batch_size, num_replicas=world, rank=rank,
                                            seed=run.seed)

    def collator(items):
        batch = collate(items)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["labels"], "idx": torch.tensor([item["idx"] for item in items])}

    micro, steps = [], []

    class Peer(transformers.Trainer):
        def get_train_dataloader(self):  # this rank's batches of our plan, as they are (no re-sharding)
            return torch.utils.data.DataLoader(items, batch_sampler=plan, collate_fn=collator)

        def training_step(self, model, inputs, *args, **kwargs):
            micro.append([int(inputs["attention_mask"].sum()), inputs.pop("idx").tolist()])
            return super().training_step(model, inputs, *args, **kwargs)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"end": time.perf_counter(), "tokens": sum(m[0] for m in micro),
                          "idx": [i for m in micro for i in m[1]]})
            micro.clear()

    # accelerate knows no distributed backend for CPU ranks and would train each rank alone, on the
    # same batches, under DeepSpeed: a user configures the state first, with gloo
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    args = transformers.TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=o.micro_batch_size, gradient_accumulation_steps=o.grad_accum,
        max_steps=spec["max_steps"], learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_epsilon=o.eps, max_grad_norm=o.max_grad_norm or 0.0, lr_scheduler_type=o.schedule,
        warmup_steps=math.ceil(o.warmup_ratio * spec["max_steps"]),
        deepspeed=deepspeed_config(run, world, lm.get_input_embeddings().weight.shape[1]), ddp_backend="gloo",
        save_strategy="no", eval_strategy="no", logging_steps=10**6, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, seed=run.seed,
        accelerator_config={"use_configured_state": True})
    Peer(model=model, args=args, train_dataset=items, data_collator=collator, callbacks=[Clock()]).train()
    dist = torch.distributed.is_initialized()
    return 0, {"steps": steps, "world": torch.distributed.get_world_size() if dist else 1,
               "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size}


def _rank_main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    rc, extra = (_rank_ours if spec["kind"] == "ours" else _rank_peer)(spec)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "rc": rc, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   **extra}, f)
    return rc


# -- the bench --------------------------------------------------------------------------------
def check_peer_batches(steps_by_rank: list[list[list[int]]], global_batch: int) -> None:
    """`steps_by_rank[rank][step]`: the record indices that rank trained on at that step. Every step's
    ranks must hold pairwise different records, and together exactly `global_batch` of them."""
    if len(steps_by_rank) < 2:
        raise AssertionError(f"peer: {len(steps_by_rank)} rank(s) reported, expected {NPROC}")
    if len({len(s) for s in steps_by_rank}) != 1:
        raise AssertionError(f"peer: ranks ran different step counts {[len(s) for s in steps_by_rank]}")
    for step, batches in enumerate(zip(*steps_by_rank)):
        flat = [i for b in batches for i in b]
        if len(set(flat)) != len(flat):
            raise AssertionError(f"peer step {step}: ranks trained on the same records {batches}")
        if len(flat) != global_batch:
            raise AssertionError(f"peer step {step}: global batch {len(flat)}, ours is {global_batch}")


def launch(name: str, spec: dict) -> tuple[str, list[dict]]:
    """Run one side under DeepSpeed's launcher on NPROC ranks; (its folder, the ranks' reports)."""
    from mm_teamlora.train.launch import _free_port

    out = spec["out"] = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    spec_path = os.path.join(out, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // NPROC)))  # as train/launch.py
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(NPROC), "--master_port",
               str(_free_port()), os.path.abspath(__file__), "_rank", spec_path]
    start = time.perf_counter()
    with open(os.path.join(out, "log.txt"), "w", encoding="utf-8") as log:
        rc = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    reports = [json.load(open(p, encoding="utf-8")) for p in sorted(glob.glob(os.path.join(out, "rank*.json")))]
    if rc or len(reports) != NPROC or any(r["rc"] for r in reports):
        raise SystemExit(f"{name}: failed (exit {rc}); see {out}/log.txt")
    for folder in glob.glob(os.path.join(out, "train", "checkpoint-*")):  # ~240 MB each, not needed
        shutil.rmtree(folder)
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return out, reports


def clocked(reports: list[dict], warmup: int) -> dict:
    """Tokens (non-padding, all ranks) of the steps after `warmup` and the seconds they took on rank 0's
    clock, from the end of step `warmup` to the end of the last: the same measure on both sides."""
    clock = reports[0]["steps"]
    return {"tokens": sum(s["tokens"] for r in reports for s in r["steps"][warmup:]),
            "seconds": clock[-1]["end"] - clock[warmup - 1]["end"], "peak": [r["peak_rss_mb"] for r in reports],
            "rank_tokens": [[s["tokens"] for s in r["steps"]] for r in reports]}


def ours_figures(reports: list[dict], warmup: int) -> dict:
    measured = [s for r in reports for s in r["steps"][warmup:]]
    hits, misses = sum(s["hits"] for s in measured), sum(s["misses"] for s in measured)
    return {**clocked(reports, warmup), "supervised": sum(s["supervised"] for s in measured),
            "cache": f"{hits}/{hits + misses}" if hits + misses else "-"}


def peer_figures(reports: list[dict], warmup: int, global_batch: int) -> dict:
    for r in reports:
        assert r["world"] == NPROC, f"peer rank {r['rank']} ran in a world of {r['world']}, not {NPROC}"
        assert r["global_batch"] == global_batch, f"peer global batch {r['global_batch']}, ours {global_batch}"
    check_peer_batches([[s["idx"] for s in r["steps"]] for r in reports], global_batch)
    figures = clocked(reports, warmup)
    return {**figures, "supervised": figures["tokens"], "cache": "-"}


def check_same_batches(ours: dict, peer: dict, name: str) -> None:
    """Every rank's every step holds the same non-padding tokens on both sides (`rank_tokens[rank][step]`)."""
    if ours["rank_tokens"] != peer["rank_tokens"]:
        raise AssertionError(f"{name} and the peer trained on different batches (tokens per rank and step: "
                             f"{ours['rank_tokens']} vs {peer['rank_tokens']})")


def gemm_flops(n: int = 2048, seconds: float = 3.0) -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, until = math.inf, time.perf_counter() + seconds
    a @ b
    while time.perf_counter() < until:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def shapes_and_ranks():
    """(frozen matmul parameters, head parameters, {method: (rank, adapter parameters)}), counted on the
    model training builds, ranks matched to the base run's TeamLoRA (adapters/matching.py)."""
    import dataclasses

    from mm_teamlora.adapters.matching import layer_shapes, matching_rank, parameter_count
    from mm_teamlora.data import build_dataset
    from mm_teamlora.model import MultimodalLM
    from mm_teamlora.train import RunConfig
    from mm_teamlora.train.engine import model_config

    base = RunConfig.from_yaml(BASE_RUN)
    model = MultimodalLM.from_config(model_config(base)[0])
    shapes = layer_shapes(model.language_model, base.adapter)
    ranks = {}
    for method in ("lora", "moelora", "hydralora", "teamlora"):
        r = base.adapter.r if method == base.adapter.method else matching_rank(shapes, base.adapter, method)
        ranks[method] = (r, parameter_count(shapes, dataclasses.replace(base.adapter, method=method, r=r)))
    for data in (base.data, TEXT_DATA):  # the tokenised caches, built once before the ranks read them
        build_dataset(data, **model.data_inputs())
    head = model.language_model.get_output_embeddings().weight.numel()
    return sum(i * o for i, o in shapes), head, ranks, base.optim.global_batch_size(NPROC), model.image_token_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    parser.add_argument("--methods", nargs="+", default=[*METHODS, "peer"], choices=[*METHODS, "peer"])
    parser.add_argument("--quick", action="store_true", help="both levers only (no lever ablation)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the clock starts at the end of the last warm-up step")
    warmup, steps = args.warmup, args.steps
    total = warmup + steps
    levers = ["both"] if args.quick else list(LEVERS)
    os.makedirs(OUT, exist_ok=True)
    p_frozen, p_head, ranks, global_batch, image_tokens = shapes_and_ranks()
    gemm = [gemm_flops()]
    common = ["val_samples=0", "eval_steps=0", "save_minutes=null", "save_steps=0", "tensorboard=false",
              f"optim.max_steps={total}", "optim.max_minutes=null"]  # logging as the run YAML has it
    cache_dir = os.path.join(OUT, "feature-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)

    def ours(name, key, lever="both", data=None):
        method, implementation = METHODS[key]
        logits, cache = LEVERS[lever]
        overrides = [*common, f"adapter.method={method}", f"adapter.r={ranks[method][0]}",
                     f"adapter.implementation={implementation}", f"feature_cache={cache_dir if cache else 'false'}",
                     f"supervised_logits={'true' if logits else 'false'}",
                     f"output_dir={os.path.join(OUT, name, 'train')}", *([f"data={data}"] if data else [])]
        _, reports = launch(name, {"kind": "ours", "overrides": overrides})
        figures = ours_figures(reports, warmup)
        head_tokens = figures["supervised"] if logits else figures["tokens"]
        figures["flops"] = 4 * p_frozen * figures["tokens"] + 4 * p_head * head_tokens + 6 * ranks[method][1] * figures["tokens"]
        return figures

    ours_methods = [m for m in args.methods if m in METHODS]
    rows = {}
    print(f"{len(ours_methods)} method(s) x levers {levers}, {warmup} warm-up + {steps} measured steps, {NPROC} ranks",
          flush=True)
    if any(LEVERS[lever][1] for lever in levers) and ours_methods:
        ours("prime-cache", ours_methods[0])  # stores the tower features of exactly these steps
    for lever in levers:
        for key in ours_methods:
            rows[(key, lever, "mixture")] = ours(f"{key}-{lever}", key, lever)
    if "peer" in args.methods:
        for key in ("lora", "teamlora"):
            if key in ours_methods:
                rows[(key, "both", "text")] = ours(f"{key}-text", key, data=TEXT_DATA)
        peer_overrides = [*common, f"data={TEXT_DATA}"]
        out, reports = launch("peer", {"kind": "peer", "overrides": peer_overrides, "r": ranks["lora"][0],
                                       "max_steps": total, "image_tokens": image_tokens})
        figures = peer_figures(reports, warmup, global_batch)
        figures["flops"] = (4 * p_frozen + 4 * p_head + 6 * ranks["lora"][1]) * figures["tokens"]
        rows[("peer", "both", "text")] = figures
        for key in ("lora", "teamlora"):
            if (key, "both", "text") in rows:
                check_same_batches(rows[key, "both", "text"], figures, key)
    gemm.append(gemm_flops())
    peak_gemm = max(gemm)

    tps = {k: f["tokens"] / f["seconds"] for k, f in rows.items()}
    print(f"\nfp32 GEMM: {' / '.join(f'{g / 1e9:.1f}' for g in gemm)} GFLOP/s (start / end); global batch "
          f"{global_batch}; ranks {', '.join(f'{m} r{r}' for m, (r, _) in ranks.items())}")
    print(f"{'method':<15} {'levers':<12} {'data':<8} {'tokens/s':>9} {'x LoRA':>7} {'peak MB r0/r1':>14} "
          f"{'GFLOP/s':>8} {'% GEMM':>7} {'cache':>9}")
    for (key, lever, data), f in rows.items():
        lora = tps.get(("lora", lever, data))
        ratio = f"{lora / tps[key, lever, data]:.3f}" if lora else "-"  # time ratio, as adapter_speed.py
        achieved = f["flops"] / f["seconds"]
        print(f"{'peer peft LoRA' if key == 'peer' else key:<15} {'-' if key == 'peer' else lever:<12} {data:<8} {tps[key, lever, data]:>9.1f} "
              f"{ratio:>7} {'/'.join(f'{p:.0f}' for p in f['peak']):>14} {achieved / 1e9:>8.2f} "
              f"{100 * achieved / peak_gemm:>7.1f} {f['cache']:>9}")

    mix = {key: tps[key, "both", "mixture"] for key in ours_methods if (key, "both", "mixture") in tps}
    result = {"gemm_gflops": peak_gemm / 1e9}
    if "teamlora" in mix:  # TeamLoRA's step time over the other's (the inverse ratio of tokens/s)
        result.update({f"team_over_{k.replace('-', '_')}": v / mix["teamlora"] for k, v in mix.items() if k != "teamlora"})
        f = rows["teamlora", "both", "mixture"]
        result.update(teamlora_tokens_s=mix["teamlora"], teamlora_gemm_fraction=f["flops"] / f["seconds"] / peak_gemm,
                      teamlora_peak_mb_max=max(f["peak"]))
    for key, lever, data in rows:
        if lever != "both":
            result[f"{key}_{lever}_slowdown".replace("-", "_")] = mix[key] / tps[key, lever, data]
        elif data == "text" and key != "peer":
            result[f"{key}_text_over_peer"] = tps[key, lever, data] / tps["peer", "both", "text"]
    print()
    for name, op, target in (("team_over_lora", "<=", 1.05), ("team_over_moelora_loop", "<=", 0.75),
                             ("teamlora_text_over_peer", ">=", 1.15)):
        if name in result:
            met = result[name] <= target if op == "<=" else result[name] >= target
            print(f"{name} = {result[name]:.3f} (target {op} {target}: {'met' if met else 'NOT met'})")
    print("\nRESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    if "_rank" in sys.argv:
        sys.exit(_rank_main(sys.argv[sys.argv.index("_rank") + 1]))
    main()
