"""Generation speed with KV cache: frozen model vs LoRA vs TeamLoRA (unmerged), side by side (not a test).

A model with SmolLM2-135M's config and random weights, all-linear adapters of rank 64 (TeamLoRA
k = 4, group routing on), greedy decoding with `generation_routing` (what `MultimodalLM.generate`
uses). Two grad modes: `inference_mode`, as `MultimodalLM.generate` runs it, and `no_grad`, as a
plain Hugging Face `model.generate` runs it; peft's LoRA is the outside anchor. tokens/s (new
tokens) is the median over interleaved repeats, min-max in brackets; `x LoRA` is the median of the
per-repeat ratios. A shared machine drifts by +-5% between whole generations, so a second table
times single decode steps with the models taking turns step by step: the steadier ratio. A third
counts the ops of one decode step with torch.profiler (the proxy for launch overhead on a GPU):
every aten op at every level, and the ops called from Python that do work ("work ops": views and
other metadata ops left out).
`--candidate` adds the rows of a candidate inference form (bench/inference_form_candidate.py).

    .venv/bin/python bench/generate_speed.py [--repeats 5] [--batch 4] [--prompt 64] [--new 32] [--steps 100] [--candidate]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mm_teamlora.adapters import AdapterConfig, apply_adapters, generation_routing, routing_context

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
RANK, ALPHA = 64, 32
TEAM = "TeamLoRA k=4"
CANDIDATE = "TeamLoRA, inference form"
GROUP = 1  # every token's group, prompt and generated
# ops that only make views or read metadata: no kernel of their own on a GPU
METADATA_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze",
                "aten::t", "aten::transpose", "aten::expand", "aten::split", "aten::split_with_sizes",
                "aten::narrow", "aten::slice", "aten::select", "aten::as_strided", "aten::unflatten",
                "aten::flatten", "aten::permute", "aten::detach", "aten::alias", "aten::_unsafe_view",
                "aten::empty", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg",
                "aten::lift_fresh", "aten::unbind", "aten::chunk", "aten::contiguous", "aten::to",
                "aten::_to_copy", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero",
                "aten::result_type", "aten::size", "aten::stride", "aten::dim"}


def build_models(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    models = {
        "frozen": base,
        "LoRA": apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=RANK, alpha=ALPHA)),
        TEAM: apply_adapters(copy.deepcopy(base), AdapterConfig(method="teamlora", r=RANK, num_experts=4,
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


def decode_steps(models: dict, ids: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """Seconds per KV-cache decode step (inference_mode), the models taking turns step by step in
    alternating order, each on a cache holding the prompt; a step's token is cropped off again,
    so every step sees the same cache."""
    times = {label: [] for label in models}
    with torch.inference_mode():
        caches = {label: DynamicCache(config=model.config) for label, model in models.items()}
        with routing_context(torch.full_like(ids, GROUP)):
            for label, model in models.items():
                model(input_ids=ids, cache=caches[label], use_cache=True)
        token, labels = ids[:, -1:], list(models)
        with routing_context(torch.full_like(token, GROUP)):
            for step in range(steps + 2):
                for label in labels if step % 2 == 0 else labels[::-1]:
                    start = time.perf_counter()
                    models[label](input_ids=token, cache=caches[label], use_cache=True)
                    if step >= 2:  # two warm-up steps
                        times[label].append(time.perf_counter() - start)
                    caches[label].crop(-1)
    return times


def ops_per_decode_step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """(aten ops at every level, ops called from Python that are not views or metadata) of one
    KV-cache decode step; the second is about the kernels a GPU would launch."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        with routing_context(torch.full_like(ids, GROUP)):
            model(input_ids=ids, cache=cache, use_cache=True)
        token = ids[:, -1:]
        with routing_context(torch.full_like(token, GROUP)):
            model(input_ids=token, cache=cache, use_cache=True)  # warm-up
            cache.crop(-1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=token, cache=cache, use_cache=True)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    called = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), sum(e.name not in METADATA_OPS for e in called)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="paired decode steps of the second table")
    parser.add_argument("--candidate", action="store_true", help="add the candidate inference form's rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = build_models(LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval().requires_grad_(False))
    if args.candidate:
        from inference_form_candidate import CandidateTeamLoRALinear, with_candidate

        models[CANDIDATE] = with_candidate(copy.deepcopy(models[TEAM]))
        assert sum(isinstance(m, CandidateTeamLoRALinear) for m in models[CANDIDATE].modules()) == 210
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.prompt))
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    runs = [("inference_mode", label) for label in ("frozen", "peft LoRA", "LoRA", TEAM, CANDIDATE) if label in models]
    runs += [("no_grad", "LoRA"), ("no_grad", TEAM)]

    def run(mode: str, label: str) -> None:
        model = models[label]
        with modes[mode](), generation_routing(model, torch.full_like(ids, GROUP), new_token_groups=GROUP):
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
          f"{args.new} new tokens, greedy, KV cache, fp32; {args.repeats} interleaved repeats")
    print(f"{'grad mode':<15} {'model':<25} {'tokens/s':>9} {'[min - max]':>15} {'x LoRA':>7}")
    for (mode, label), t in times.items():
        spread = f"[{new_tokens / max(t):.1f} - {new_tokens / min(t):.1f}]"
        print(f"{mode:<15} {label:<25} {speed[mode, label]:>9.1f} {spread:>15} {ratio[mode, label]:>7.3f}")

    step_models = {label: models[label] for label in ("frozen", "peft LoRA", "LoRA", TEAM, CANDIDATE) if label in models}
    steps = decode_steps(step_models, ids, args.steps)
    step_ratio = {label: statistics.median(lo / t for lo, t in zip(steps["LoRA"], ts)) for label, ts in steps.items()}
    ops = {label: ops_per_decode_step(model, ids) for label, model in step_models.items()}
    print(f"\ndecode steps (inference_mode, cache of {args.prompt} tokens), {args.steps} turns, median; "
          f"ops of one step (torch.profiler)")
    print(f"{'model':<25} {'ms/step':>8} {'x LoRA':>7} {'aten ops':>9} {'work ops':>9}")
    for label, t in steps.items():
        print(f"{label:<25} {statistics.median(t) * 1e3:>8.1f} {step_ratio[label]:>7.3f} {ops[label][0]:>9} {ops[label][1]:>9}")

    team = ratio["inference_mode", TEAM]
    result = (f"RESULT teamlora_over_lora={team:.3f} "
              f"teamlora_over_lora_no_grad={ratio['no_grad', TEAM]:.3f} "
              f"decode_step_teamlora_over_lora={step_ratio[TEAM]:.3f} "
              f"lora_over_frozen={1 / ratio['inference_mode', 'frozen']:.3f} "
              f"ops_per_step_teamlora={ops[TEAM][0]}/{ops[TEAM][1]} ops_per_step_lora={ops['LoRA'][0]}/{ops['LoRA'][1]}")
    if CANDIDATE in models:
        result += (f" candidate_over_lora={ratio['inference_mode', CANDIDATE]:.3f}"
                   f" decode_step_candidate_over_lora={step_ratio[CANDIDATE]:.3f}"
                   f" ops_per_step_candidate={ops[CANDIDATE][0]}/{ops[CANDIDATE][1]}")
    if "peft LoRA" in models:
        result += (f" teamlora_over_peft_lora={team / ratio['inference_mode', 'peft LoRA']:.3f}"
                   f" decode_step_teamlora_over_peft_lora={step_ratio[TEAM] / step_ratio['peft LoRA']:.3f}")
    print(result)


if __name__ == "__main__":
    main()
