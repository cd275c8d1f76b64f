"""Adapter speed and memory, side by side in one run (not a test).

Layer level: a SmolLM2-135M MLP block (576 -> 1536 -> 576, gated), all three projections adapted,
2048 tokens, forward + backward. Whole model: a training step (forward, backward, AdamW) of a model
with SmolLM2-135M's config and random weights, all-linear targets. Methods: peft's LoRA, our LoRA
(rank r), MoELoRA in its published loop form, HydraLoRA, TeamLoRA loop and fused; k = 2, 4, 8 at
layer level. Times are medians of interleaved repeats (min-max in brackets). Memory = bytes saved
for backward + trainable parameter bytes + AdamW state bytes (2 per trainable parameter).

    .venv/bin/python bench/adapter_speed.py [--repeats 5] [--tokens 2048] [--model-tokens 512]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from mm_teamlora.adapters import AdapterConfig, apply_adapters, collect_aux_loss

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
RANK, ALPHA = 64, 32.0


def variants(ks):
    """(label, builder) pairs; a builder adapts a fresh copy of the base module."""
    out = [("peft LoRA", "peft"), ("LoRA", AdapterConfig(method="lora", r=RANK, alpha=ALPHA))]
    for k in ks:
        common = dict(r=RANK, num_experts=k, alpha=ALPHA)
        out += [
            (f"MoELoRA k={k} (published loop)", AdapterConfig(method="moelora", implementation="loop", **common)),
            (f"HydraLoRA k={k}", AdapterConfig(method="hydralora", **common)),
            (f"TeamLoRA k={k} loop", AdapterConfig(method="teamlora", implementation="loop", **common)),
            (f"TeamLoRA k={k} fused", AdapterConfig(method="teamlora", **common)),
        ]
        if k == 4:  # the same fusion applied to MoELoRA: the speed-up is the fusion, not the method
            out.append((f"MoELoRA k={k} fused (ours)", AdapterConfig(method="moelora", **common)))
    return out


def adapt(base: torch.nn.Module, spec, targets) -> torch.nn.Module:
    module = copy.deepcopy(base)
    if spec == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        module = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05,
                                                    target_modules=targets), module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
        return module.train()
    config = dataclasses.replace(spec, target_modules=targets, dropout=0.05)
    return apply_adapters(module, config).train()


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while `fn` runs (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()  # not `t`: a saved output would then hold its own grad_fn, a cycle that leaks

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def trainable_bytes(module) -> tuple[int, int]:
    params = [p for p in module.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return nbytes, 2 * sum(p.numel() * 4 for p in params)  # AdamW keeps two fp32 moments


def measure(label_modules: dict, step_fns: dict, repeats: int, inner: int) -> dict:
    times = {label: [] for label in label_modules}
    for fn in step_fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for label, fn in step_fns.items():  # interleaved, so drift hits every method alike
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[label].append((time.perf_counter() - start) / inner)
    return times


def table(title: str, rows: list[tuple], baseline: str, times: dict, memory: dict) -> None:
    print(f"\n{title}")
    print(f"{'method':<32} {'median ms':>10} {'[min - max]':>17} {'x LoRA':>7} {'memory MB':>10} {'x LoRA':>7}")
    base_t, base_m = statistics.median(times[baseline]), memory[baseline]
    for label, _ in rows:
        t = times[label]
        med = statistics.median(t)
        print(f"{label:<32} {med * 1e3:>10.2f} {f'[{min(t) * 1e3:.1f} - {max(t) * 1e3:.1f}]':>17} "
              f"{med / base_t:>7.3f} {memory[label] / 2**20:>10.2f} {memory[label] / base_m:>7.3f}")


def layer_level(tokens: int, repeats: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)
    base = LlamaMLP(config).requires_grad_(False)
    x = torch.randn(1, tokens, config.hidden_size)
    rows = variants([2, 4, 8])
    modules = {label: adapt(base, spec, ["gate_proj", "up_proj", "down_proj"]) for label, spec in rows}

    def step(module):
        def run():
            inp = x.clone().requires_grad_(True)  # hidden states carry grad in a real model
            out = module(inp)
            (out.float().square().mean() + collect_aux_loss(module)).backward()
            for p in module.parameters():
                p.grad = None
        return run

    times = measure(modules, {label: step(m) for label, m in modules.items()}, repeats, inner=3)
    memory = {}
    for label, m in modules.items():
        act = saved_bytes(lambda: m(x.clone().requires_grad_(True)))
        collect_aux_loss(m)  # release the graph the routed layers' balance losses hold
        params, optim = trainable_bytes(m)
        memory[label] = act + params + optim
    table(f"Layer level: SmolLM2-135M MLP block, {tokens} tokens, rank {RANK}, fp32, forward+backward",
          rows, "LoRA", times, memory)
    return times, memory


def model_level(tokens: int, repeats: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).requires_grad_(False)
    rows = [(label, spec) for label, spec in variants([4]) if "TeamLoRA k=4 loop" not in label]
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, tokens))
    steps, memory = {}, {}
    for label, spec in rows:
        model = adapt(base, spec, "all-linear")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            loss = model(input_ids=ids, labels=ids).loss + collect_aux_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[label] = step
        params, optim = trainable_bytes(model)
        memory[label] = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss) + params + optim
        collect_aux_loss(model)  # release the graph the routed layers' balance losses hold
    times = measure(steps, steps, repeats, inner=1)
    table(f"Whole-model step: SmolLM2-135M config (random weights), {tokens} tokens, all-linear, "
          f"rank {RANK}, fp32, AdamW", rows, "LoRA", times, memory)
    return times, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--model-tokens", type=int, default=512)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lt, lm = layer_level(args.tokens, args.repeats)
    mt, mm = model_level(args.model_tokens, args.repeats)
    med = lambda times, label: statistics.median(times[label])  # noqa: E731
    result = {
        "layer_team_fused_over_lora": med(lt, "TeamLoRA k=4 fused") / med(lt, "LoRA"),
        "layer_team_fused_over_moelora": med(lt, "TeamLoRA k=4 fused") / med(lt, "MoELoRA k=4 (published loop)"),
        "layer_team_fused_over_team_loop": med(lt, "TeamLoRA k=4 fused") / med(lt, "TeamLoRA k=4 loop"),
        "layer_mem_team_over_lora": lm["TeamLoRA k=4 fused"] / lm["LoRA"],
        "model_team_over_peft_lora": med(mt, "TeamLoRA k=4 fused") / med(mt, "peft LoRA"),
        "model_team_over_lora": med(mt, "TeamLoRA k=4 fused") / med(mt, "LoRA"),
        "model_team_over_moelora": med(mt, "TeamLoRA k=4 fused") / med(mt, "MoELoRA k=4 (published loop)"),
        "model_mem_team_over_lora": mm["TeamLoRA k=4 fused"] / mm["LoRA"],
        "model_moelora_fused_over_moelora": med(mt, "MoELoRA k=4 fused (ours)") / med(mt, "MoELoRA k=4 (published loop)"),
    }
    print("\nRESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
