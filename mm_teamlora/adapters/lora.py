"""The adapter layer base class and plain LoRA.

Every adapter layer wraps a frozen linear layer `base_layer` (an `nn.Linear`, or a GPT-2 style
`Conv1D` whose weight is stored transposed) and returns `base_layer(x) + update(x)`, a plain tensor,
so the model around it needs no change. Adapter tensors are created on the base weight's device and
in its dtype; their maths runs in that dtype and the result is added in the base output's dtype.

LoRA (Hu et al. 2021): `y = W0 x + b + s * B A dropout(x)`, `A (r x d_in)` Kaiming-uniform
(a = sqrt 5), `B (d_out x r)` zero, `s = alpha / r`. Names and init follow peft, so a LoRA layer
saves to peft's layout directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D`: a linear layer whose weight is (d_in, d_out).
    Recognised by its documented attributes, so this package need not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or `Conv1D`."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"can only adapt nn.Linear or Conv1D layers, not {type(module).__name__}")


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """What `nn.init.kaiming_uniform_(w, a=sqrt(5))` draws (LoRA's and nn.Linear's init), on CPU
    from `generator` so a seed gives the same adapter on any device."""
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class AdapterLayer(nn.Module):
    """Base of every adapter layer: holds the frozen base layer and the method's config."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig):
        super().__init__()
        self.in_features, self.out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.config = config
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)
        weight = base_layer.weight
        self._factory = {"device": weight.device, "dtype": weight.dtype}

    def _drop(self, t: torch.Tensor) -> torch.Tensor:
        """Dropout, skipped entirely when it is the identity (eval, or p = 0)."""
        return self.dropout(t) if self.training and self.dropout.p > 0 else t

    def _param(self, value: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(value.to(**self._factory))

    def _add_update(self, result: torch.Tensor, z: torch.Tensor, lora_B: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """result + alpha z @ lora_B^T, fused into one GEMM (addmm) when dtypes agree; not in
        place, since a hook on the base layer may hold its output."""
        if result.dtype == z.dtype and result.is_contiguous():
            out = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]), lora_B.t(), alpha=alpha)
            return out.view(result.shape)
        return result + (F.linear(z, lora_B) * alpha).to(result.dtype)

    def merge_into_base(self, delta: torch.Tensor) -> nn.Module:
        """Add `delta (d_out x d_in)` to the base weight in place and return the base layer."""
        weight = self.base_layer.weight
        with torch.no_grad():
            weight += (delta.t() if is_conv1d(self.base_layer) else delta).to(weight.dtype)
        return self.base_layer

    def delta_weight(self, expert_weights=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.config.method}, in={self.in_features}, out={self.out_features}, r={self.config.r}"


class LoRALinear(AdapterLayer):
    """Rank-r LoRA: `y = base(x) + (alpha / r) * B A dropout(x)`."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base_layer, config)
        self.lora_A = self._param(kaiming_uniform((config.r, self.in_features), self.in_features, generator))
        self.lora_B = self._param(torch.zeros(self.out_features, config.r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # scale the rank-r activations, not the d_out-wide output: same maths, less work
        z = F.linear(self._drop(x.to(self.lora_A.dtype)), self.lora_A) * self.scaling
        return self._add_update(result, z, self.lora_B)

    def delta_weight(self, expert_weights=None) -> torch.Tensor:
        if expert_weights is not None:
            raise ValueError("plain LoRA has no experts; call merge_adapters without expert_weights")
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())
