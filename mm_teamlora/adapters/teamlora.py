"""TeamLoRA (Lin et al., ACL 2025): expert collaboration and competition.

For a token x entering a frozen linear layer W0 (d_out x d_in), with k experts, total rank r,
per-expert rank r_b = r / k and scaling s = alpha / r_b:

    z   = s * A x                      A (r x d_in): the shared "general module", Kaiming-uniform
    z_i = chunk i of z (size r_b)      expert i reads only its chunk
    h_i = B_i dropout(z_i)             B_i (d_out x r_b): the "expert modules", zero at init
    phi = softmax(R x [+ g[group]])    R (k x d_in): dense router ("Shapley module")
    v   = phi (I + M)                  M (k x k): learned interaction, U(-0.1, 0.1), zero diagonal
    w   = k * v / sum(v)               (`reference`) or k * v / max(sum|v|, eps) (`l1`, default)
    y   = W0 x + b + sum_i w_i h_i

With `competition` off, v = phi and w = k * phi. With every w_i = 1 the layer is exactly a rank-r
LoRA with scaling alpha / r_b. The fused form computes the whole update with one GEMM for [A; R]
and one for [B_1 ... B_k]:  sum_i w_i B_i z_i = [B_1 ... B_k] (z * repeat_interleave(w, r_b)).
The loop form (`implementation="loop"`) is the readable reference, one matmul per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .lora import kaiming_uniform
from .routed import RoutedAdapterLayer, fixed_expert_weights


class TeamLoRALinear(RoutedAdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base_layer, config, generator)
        self.expert_rank = config.expert_rank
        self._down_cache = None
        self.lora_A = self._param(kaiming_uniform((config.r, self.in_features), self.in_features, generator))
        # [B_1 ... B_k] side by side: expert i owns columns i*r_b .. (i+1)*r_b
        self.lora_B = self._param(torch.zeros(self.out_features, config.r))
        if config.competition:
            m = torch.empty(self.num_experts, self.num_experts).uniform_(-0.1, 0.1, generator=generator)
            self.competition = self._param(m.fill_diagonal_(0.0))
        else:
            self.competition = None

    def _interaction(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v = phi (I + M) and the normaliser `total` of w = k v / total (see module doc)."""
        v = probs if self.competition is None else torch.addmm(probs, probs, self.competition.float())
        if self.config.competition_norm == "reference":
            return v, v.sum(-1, keepdim=True)
        return v, torch.linalg.vector_norm(v, ord=1, dim=-1, keepdim=True).clamp_min(1e-6)

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """w from router probabilities phi (N, k), float32; entries sum to k (see module doc)."""
        v, total = self._interaction(probs)
        return v * (self.num_experts / total)

    def _down_weight(self) -> torch.Tensor:
        """[A; R] for the fused GEMM. Without grad (generation) the concatenation is cached and
        rebuilt only when A or R change (an optimizer step or a load bumps their version)."""
        if torch.is_grad_enabled():
            return torch.cat([self.lora_A, self.router])
        key = (self.lora_A._version, self.router._version, self.lora_A.data_ptr(), self.router.data_ptr())
        if self._down_cache is None or self._down_cache[0] != key:
            self._down_cache = (key, torch.cat([self.lora_A, self.router]).detach())
        return self._down_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        groups, mask, replay = self._routing_inputs(x)
        xa = x.to(self.lora_A.dtype)
        r, k = self.config.r, self.num_experts
        if self.config.implementation == "fused":
            z, logits = F.linear(xa, self._down_weight()).split([r, k], dim=-1)
        else:
            z, logits = F.linear(xa, self.lora_A), F.linear(xa, self.router)
        probs = self.router_probs(logits.reshape(-1, k), groups)
        v, total = self._interaction(probs)
        if self.recorder is not None or torch.is_grad_enabled() or self.training:
            self._observe(probs, v * (k / total), groups, mask, replay)
        else:
            self.balance_loss = None  # an inference forward (e.g. a decode step): nothing to observe
        # w_i = k v_i / total and s both scale chunk i: fold them into one (N, k) factor, not (N, r)
        scale = (v * ((k * self.scaling) / total)).to(z.dtype).view(*x.shape[:-1], k)
        if self.config.implementation == "loop":
            for i in range(k):
                cols = slice(i * self.expert_rank, (i + 1) * self.expert_rank)
                h_i = F.linear(self._drop(z[..., cols]), self.lora_B[:, cols])
                result = result + (h_i * scale[..., i : i + 1]).to(result.dtype)
            return result
        z = self._drop(z).unflatten(-1, (k, self.expert_rank)) * scale.unsqueeze(-1)
        return self._add_update(result, z.flatten(-2), self.lora_B)

    def delta_weight(self, expert_weights) -> torch.Tensor:
        """s * [B_1 ... B_k] diag(repeat_interleave(w, r_b)) A for fixed weights w (sum k = uniform ones)."""
        w = fixed_expert_weights(expert_weights, self.num_experts, self.lora_B.device).repeat_interleave(self.expert_rank)
        return self.scaling * (self.lora_B.float() * w) @ self.lora_A.float()
