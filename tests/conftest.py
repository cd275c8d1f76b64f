"""Tiny random causal LMs built from configs (no downloads), shared by the tests."""

import pytest
import torch
import yaml
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config)

VOCAB = 128


def tiny_config(family: str):
    if family == "llama":  # also the shape of SmolLM2 and Qwen2 (gated MLP, GQA)
        return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen2":
        return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          bos_token_id=1, eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    raise ValueError(family)


def tiny_model(family: str = "llama", dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    return model.eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding on the second row
    return ids, mask


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """Tokenised sources, converted models and vision features stay out of the user's caches."""
    monkeypatch.setenv("MM_TEAMLORA_CACHE", str(tmp_path / "cache"))


def write_tiny_run(path, adapter: dict | None = None, optim: dict | None = None) -> str:
    """A run YAML of the tiny preset (TeamLoRA r = 8, k = 4, group routing, ZeRO-2) for recipes that
    set `data` and `output_dir` themselves (`demo`, `compare`); `adapter` / `optim` update its keys."""
    path.write_text(yaml.safe_dump({
        "model": "tiny-random", "data": "unused.yaml", "output_dir": "unused",
        "adapter": {"method": "teamlora", "r": 8, "num_experts": 4, "group_routing": True, "dropout": 0.0,
                    **(adapter or {})},
        "optim": {"lr": 1e-2, "micro_batch_size": 4, "max_steps": 3, **(optim or {})}, "deepspeed": 2,
        "tensorboard": False, "log_steps": 1}))
    return str(path)
