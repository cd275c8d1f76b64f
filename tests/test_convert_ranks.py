"""A converter's cache written from inside a training rank holds its weights.

transformers' `save_pretrained` writes weights only on global rank 0 once a process group exists, so
the embedded default, converted on first use inside `mm-teamlora train --nproc 2`, once came out of
rank 1 as a folder of tokenizer files marked complete. `save_hf_model` writes from any rank."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mm_teamlora.model.convert import save_hf_model
from mm_teamlora.train.engine import free_port


def _tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _save_on_rank(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        save_hf_model(_tiny_lm(), os.path.join(root, f"rank{rank}"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_rank_writes_a_loadable_folder(tmp_path):
    mp.spawn(_save_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    reference = _tiny_lm()
    ids = torch.tensor([[1, 5, 9, 3]])
    for rank in (0, 1):
        folder = tmp_path / f"rank{rank}"
        assert {"config.json", "model.safetensors"} <= set(os.listdir(folder)), rank
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
