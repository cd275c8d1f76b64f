"""A small, real adapter example: LoRA vs TeamLoRA on a frozen tiny Llama, in about a minute on CPU.

The task has two kinds of token ("groups", as image and text tokens will be in the multimodal
model): a group-0 sequence follows x_{t+1} = (x_t + 7) mod V, a group-1 sequence follows
x_{t+1} = (5 x_t + 3) mod V. Sequences have random lengths and are right-padded. The frozen base is
random, so everything it learns comes from the adapter (plus the final norm, kept trainable through
`modules_to_save` so the logits can sharpen in front of the frozen head). TeamLoRA gets the group ids through
`routing_context` with group routing on, and the run shows how its experts split between groups.

Both adapters get the same effective update gain (TeamLoRA's alpha is LoRA's divided by k; see the
scale confound in TEAMLORA.md 4b) and the same steps, learning rate and data.
"""

from __future__ import annotations

import os
import time

import torch

from .adapters import (AdapterConfig, apply_adapters, collect_aux_loss, load_adapter, record_routing,
                       routing_context, save_adapter, trainable_parameter_report)

VOCAB, MAX_LEN = 64, 24
RULES = {0: lambda x: (x + 7) % VOCAB, 1: lambda x: (5 * x + 3) % VOCAB}


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                         pad_token_id=VOCAB)
    return LlamaForCausalLM(config)


def make_batch(n: int, generator: torch.Generator):
    """Token ids, attention mask, per-token group ids and labels (-100 on padding)."""
    ids = torch.full((n, MAX_LEN), VOCAB)
    groups = torch.randint(0, 2, (n,), generator=generator)
    lengths = torch.randint(MAX_LEN // 2, MAX_LEN + 1, (n,), generator=generator)
    for row in range(n):
        x = int(torch.randint(0, VOCAB, (1,), generator=generator))
        for t in range(int(lengths[row])):
            ids[row, t] = x
            x = RULES[int(groups[row])](x)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
    labels = ids.masked_fill(~mask, -100)
    return ids, mask, groups[:, None].expand(n, MAX_LEN).contiguous(), labels


def accuracy_by_group(model, batch) -> dict[int, float]:
    ids, mask, groups, _ = batch
    with torch.no_grad(), routing_context(groups, mask):
        predicted = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].argmax(-1)
    correct = (predicted == ids[:, 1:]) & mask[:, 1:]
    return {g: float(correct[groups[:, 1:] == g].sum() / mask[:, 1:][groups[:, 1:] == g].sum()) for g in (0, 1)}


def train(model, steps: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        ids, mask, groups, labels = make_batch(32, generator)
        with routing_context(groups, mask):
            loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        (loss + collect_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_adapter_demo(steps: int = 150, out: str = "runs/adapter-demo", seed: int = 0) -> dict:
    k, r, alpha = 4, 16, 32.0
    # the final norm sets the logits' scale in front of the frozen random head: train it too
    saved = ["model.norm"]
    configs = {
        "lora": AdapterConfig(method="lora", r=r, alpha=alpha, dropout=0.0, modules_to_save=saved, seed=seed),
        "teamlora": AdapterConfig(method="teamlora", r=r, num_experts=k, alpha=alpha / k, dropout=0.0,
                                  group_routing=True, num_token_groups=2, balance_weight=0.01,
                                  modules_to_save=saved, seed=seed),
    }
    held_out = make_batch(256, torch.Generator().manual_seed(seed + 99))
    base_acc = accuracy_by_group(tiny_llama(seed).eval(), held_out)
    print(f"frozen base model: next-token accuracy group0 {base_acc[0]:.1%}, group1 {base_acc[1]:.1%}")
    results = {}
    for name, config in configs.items():
        model = apply_adapters(tiny_llama(seed), config)
        start = time.perf_counter()
        losses = train(model, steps, seed)
        model.eval()
        acc = accuracy_by_group(model, held_out)
        results[name] = {"first_loss": losses[0], "last_loss": sum(losses[-5:]) / 5, "accuracy": acc}
        print(f"\n{trainable_parameter_report(model)}")
        print(f"{name}: loss {losses[0]:.3f} -> {results[name]['last_loss']:.3f} in {steps} steps "
              f"({time.perf_counter() - start:.1f} s); held-out accuracy group0 {acc[0]:.1%}, group1 {acc[1]:.1%}")
    ids, mask, groups, _ = held_out
    with torch.no_grad(), routing_context(groups, mask):
        with record_routing(model) as record:
            model(input_ids=ids, attention_mask=mask.long())
        expected = model(input_ids=ids, attention_mask=mask.long()).logits  # the form `reloaded` runs
    print("\nTeamLoRA routing by group (mean router probability per expert, real tokens only):")
    separation = record.separation(0, 1)
    for layer_name, stats in record.summary().items():
        row = "  ".join(f"g{g}: [{', '.join(f'{p:.2f}' for p in s['mean_router_prob'])}]" for g, s in stats.items())
        print(f"  {layer_name:<34} {row}  JS {separation[layer_name]:.3f} bits")
    save_adapter(model, out)
    reloaded = load_adapter(tiny_llama(seed).eval(), out)
    with torch.no_grad(), routing_context(groups, mask):
        same = torch.equal(reloaded(input_ids=ids, attention_mask=mask.long()).logits, expected)
    print(f"\nsaved the TeamLoRA adapter to {os.path.abspath(out)}; reloaded into a fresh base model: "
          f"{'identical logits' if same else 'LOGITS DIFFER'}")
    if not same:
        raise RuntimeError("reloaded adapter does not reproduce the trained model")
    results["teamlora"]["mean_js_bits"] = sum(separation.values()) / len(separation)
    return results
