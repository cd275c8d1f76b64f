"""Where the text-only gap to Trainer + peft sits (not a test): the model path alone, one process, no
DeepSpeed, no training loop. On the same text-only records (runs/demo-data/binding.yaml), micro-batch 4,
our collator's padding: forward + backward of

    ours       the training model (`train.engine.build_model`, LoRA at TeamLoRA's trainable parameters,
               r66, as bench/train_throughput.py) with supervised-only logits
    ours_full  the same with the LM head at every position (`all_logits`)
    peer       peft LoRA (the same rank, all-linear, alpha and dropout) on the bare language model, labels

Interleaved repeats, medians; tokens/s counts non-padding tokens. If `ours` is faster here than the
peer while `bench/train_throughput.py` finds it slower, the difference is in the training loop or
the engine, not in the model.

    .venv/bin/python bench/text_step_model_level.py [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from train_throughput import BASE_RUN, TEXT_DATA  # the throughput bench's run and text-only records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from mm_teamlora.adapters.matching import layer_shapes, matching_rank
    from mm_teamlora.data import DataCollator, build_dataset
    from mm_teamlora.model import zoo
    from mm_teamlora.train import RunConfig
    from mm_teamlora.train.engine import build_model, model_config

    torch.manual_seed(0)
    base = RunConfig.from_yaml(BASE_RUN, [f"data={TEXT_DATA}"])
    lm, _ = zoo.preset_language_model(model_config(base)[0].lm_path, torch.float32)
    r = matching_rank(layer_shapes(lm, base.adapter), base.adapter, "lora")
    run = RunConfig.from_yaml(BASE_RUN, [f"data={TEXT_DATA}", "adapter.method=lora", f"adapter.r={r}"])
    ours = build_model(run).train()
    a = run.adapter
    peer = get_peft_model(lm, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                         target_modules="all-linear", task_type="CAUSAL_LM")).train()
    records = build_dataset(run.data, **ours.data_inputs())
    collate = DataCollator.from_tokenizer(ours.tokenizer)
    batches = [collate([records[i] for i in range(4 * j, 4 * j + 4)]) for j in range(args.batches)]

    def ours_step(batch, all_logits=False):
        out = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                   pixel_values=batch.get("pixel_values"), image_counts=batch.get("image_counts"),
                   supervised_only=True, all_logits=all_logits)
        out.loss_sum.backward()

    def peer_step(batch):
        peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()

    steps = {"ours": ours_step, "ours_full": lambda b: ours_step(b, all_logits=True), "peer": peer_step}
    times = {name: [] for name in steps}
    for step in steps.values():
        step(batches[0])  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            times[name].append(time.perf_counter() - start)
            ours.zero_grad(set_to_none=True)
            peer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"LoRA r{r}; {len(batches)} batches, {tokens} tokens, {torch.get_num_threads()} threads")
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, value in tps.items():
        print(f"{name:<10} {value:8.1f} tokens/s")
    print(f"\nRESULT ours_over_peer={tps['ours'] / tps['peer']:.3f} ours_full_over_peer={tps['ours_full'] / tps['peer']:.3f}")


if __name__ == "__main__":
    main()
