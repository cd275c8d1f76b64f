"""Generation speed with KV cache: frozen model vs LoRA vs TeamLoRA (unmerged), side by side (not a test).

A model with SmolLM2-135M's config and random weights, all-linear adapters of rank 64 (TeamLoRA
k = 4, group routing on), greedy decoding under a routing context. Two grad modes:
`inference_mode`, as `MultimodalLM.generate` runs it, and `no_grad`, as a plain Hugging Face
`model.generate` runs it; peft's LoRA is the outside anchor. TeamLoRA runs its compiled CPU routing
tail (mm_teamlora/adapters/kernels.py; built on first use) and, in the `PyTorch ops` row, the same
inference form without it. tokens/s (new tokens) is the median over interleaved repeats, min-max
in brackets; `x LoRA` is the median of the per-repeat ratios.

    .venv/bin/python bench/generate_speed.py [--repeats 5] [--batch 4] [--prompt 64] [--new 32]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mm_teamlora.adapters import AdapterConfig, apply_adapters, kernels, routing_context

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
RANK, ALPHA = 64, 32


def build_models(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    models = {
        "frozen": base,
        "LoRA": apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=RANK, alpha=ALPHA)),
        "TeamLoRA k=4": apply_adapters(copy.deepcopy(base), AdapterConfig(method="teamlora", r=RANK, num_experts=4,
                                                                          alpha=ALPHA, group_routing=True)),
    }
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:  # peft comes with the test extra; without it the anchor row is left out
        pass
    else:
        models["peft LoRA"] = inject_adapter_in_model(
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"), copy.deepcopy(base)).eval()
    for model in models.values():  # non-zero B, so adapters do their full work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = build_models(LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval().requires_grad_(False))
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.prompt))
    groups = torch.ones_like(ids)
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    ops_only = "TeamLoRA, PyTorch ops"
    runs = [("inference_mode", label) for label in ("frozen", "peft LoRA", "LoRA", "TeamLoRA k=4", ops_only)
            if label in models or label == ops_only]
    runs += [("no_grad", "LoRA"), ("no_grad", "TeamLoRA k=4")]
    kernel = kernels.cpu_route_kernel()  # built here (once), not inside a timed run

    def run(mode: str, label: str) -> None:
        model = models["TeamLoRA k=4" if label == ops_only else label]
        ops = kernels.pytorch_ops_only() if label == ops_only else contextlib.nullcontext()
        with ops, modes[mode](), routing_context(groups):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == args.prompt + args.new

    for key in runs:
        run(*key)  # warm-up
    times = {key: [] for key in runs}
    for repeat in range(args.repeats):
        for key in runs if repeat % 2 == 0 else runs[::-1]:  # alternating order: a steady drift cancels
            start = time.perf_counter()
            run(*key)
            times[key].append(time.perf_counter() - start)
    new_tokens = args.batch * args.new
    speed = {key: new_tokens / statistics.median(t) for key, t in times.items()}
    # x LoRA: the median over repeats of the ratio within one repeat, so slow drifts of a shared
    # machine cancel out instead of landing on whichever model ran in the slow minute
    ratio = {(mode, label): statistics.median(lo / t for lo, t in zip(times[mode, "LoRA"], ts))
             for (mode, label), ts in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, KV cache, fp32; {args.repeats} interleaved repeats; "
          f"CPU routing kernel {'built' if kernel is not None else 'NOT built: TeamLoRA rows run PyTorch ops'}")
    print(f"{'grad mode':<15} {'model':<21} {'tokens/s':>9} {'[min - max]':>15} {'x LoRA':>7}")
    for (mode, label), t in times.items():
        spread = f"[{new_tokens / max(t):.1f} - {new_tokens / min(t):.1f}]"
        print(f"{mode:<15} {label:<21} {speed[mode, label]:>9.1f} {spread:>15} {ratio[mode, label]:>7.3f}")
    team = ratio["inference_mode", "TeamLoRA k=4"]
    result = (f"RESULT teamlora_over_lora={team:.3f} "
              f"teamlora_over_lora_no_grad={ratio['no_grad', 'TeamLoRA k=4']:.3f} "
              f"teamlora_pytorch_ops_over_lora={ratio['inference_mode', ops_only]:.3f} "
              f"lora_over_frozen={1 / ratio['inference_mode', 'frozen']:.3f}")
    if "peft LoRA" in models:
        result += f" teamlora_over_peft_lora={team / ratio['inference_mode', 'peft LoRA']:.3f}"
    print(result)

if __name__ == "__main__":
    main()
