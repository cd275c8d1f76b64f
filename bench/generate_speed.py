"""Generation speed with KV cache: frozen model vs LoRA vs TeamLoRA (unmerged), side by side (not a test).

A model with SmolLM2-135M's config and random weights, all-linear adapters of rank 64 (TeamLoRA
k = 4, group routing on), greedy decoding under a routing context, as the multimodal model runs it.
Times are medians of interleaved repeats (min-max in brackets); tokens/s counts new tokens.

    .venv/bin/python bench/generate_speed.py [--repeats 5] [--batch 4] [--prompt 64] [--new 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mm_teamlora.adapters import AdapterConfig, apply_adapters, routing_context

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval().requires_grad_(False)
    models = {
        "frozen": base,
        "LoRA": apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=64, alpha=32)),
        "TeamLoRA k=4": apply_adapters(copy.deepcopy(base), AdapterConfig(method="teamlora", r=64, num_experts=4,
                                                                          alpha=32, group_routing=True)),
    }
    for model in models.values():  # non-zero B, so adapters do their full work
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.01)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.prompt))
    groups = torch.ones_like(ids)

    def run(model):
        with torch.no_grad(), routing_context(groups):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == args.prompt + args.new

    times = {label: [] for label in models}
    for model in models.values():
        run(model)  # warm-up
    for _ in range(args.repeats):
        for label, model in models.items():
            start = time.perf_counter()
            run(model)
            times[label].append(time.perf_counter() - start)
    new_tokens = args.batch * args.new
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, KV cache, fp32")
    print(f"{'model':<16} {'tokens/s':>9} {'[min - max]':>17} {'x LoRA':>7}")
    lora = new_tokens / statistics.median(times["LoRA"])
    speed = {}
    for label, t in times.items():
        speed[label] = new_tokens / statistics.median(t)
        print(f"{label:<16} {speed[label]:>9.1f} {f'[{new_tokens / max(t):.1f} - {new_tokens / min(t):.1f}]':>17} "
              f"{speed[label] / lora:>7.3f}")
    print(f"RESULT teamlora_over_lora={speed['TeamLoRA k=4'] / lora:.3f} lora_over_frozen={lora / speed['frozen']:.3f} "
          f"teamlora_over_frozen={speed['TeamLoRA k=4'] / speed['frozen']:.3f}")


if __name__ == "__main__":
    main()
