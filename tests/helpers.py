"""Shared helpers for the adapter tests."""

import torch

from mm_teamlora.adapters import AdapterConfig, adapter_layers, apply_adapters
from conftest import tiny_model


def randomize_adapters(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter tensor (B, router, M, group bias) random non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer."):
                    p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def adapted(family="llama", dtype=torch.float32, **config):
    config.setdefault("dropout", 0.0)
    config.setdefault("r", 8)
    model = tiny_model(family, dtype=dtype)
    return apply_adapters(model, AdapterConfig(**config))


def one_layer(d_in, d_out=None, dtype=torch.float32, **config):
    """An eval-mode `nn.Sequential` of one adapted `nn.Linear(d_in, d_out)` (module name "0")."""
    from torch import nn

    base = nn.Sequential(nn.Linear(d_in, d_out or d_in)).to(dtype).eval()
    return apply_adapters(base, AdapterConfig(target_modules=["0"], **config))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
