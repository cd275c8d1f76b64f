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
LoRA with scaling alpha / r_b. Expert masks (routed.py): masked experts are out of the softmax (phi
renormalised over the rest) and v is zeroed on them before the normalisation.
Two forms compute this, in training, evaluation and generation alike:
- `fused` (the default, what trains and runs): one GEMM for A, the router's, and one for
  [B_1 ... B_k], as the cost of one rank-r LoRA plus a d_in -> k router:
      sum_i w_i h_i = k s [B_1 ... B_k] dropout(A x * repeat_interleave(w / k, r_b)),
  with k s as the last GEMM's alpha (no low-precision tensor grows by it);
- `loop` (`implementation="loop"`): the readable reference, the lines above with one matmul per
  expert. The two agree exactly at dropout 0 (tests/test_adapter_layers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .lora import kaiming_uniform
from .routed import RoutedAdapterLayer, as_float32, fixed_expert_weights

L1_GUARD = 1e-6  # w = k v / max(|v|_1, L1_GUARD)


class TeamLoRALinear(RoutedAdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base_layer, config, generator)
        self.expert_rank = config.expert_rank
        self._fused = config.implementation == "fused"
        self.lora_A = self._param(kaiming_uniform((config.r, self.in_features), self.in_features, generator))
        # [B_1 ... B_k] side by side: expert i owns columns i*r_b .. (i+1)*r_b
        self.lora_B = self._param(torch.zeros(self.out_features, config.r))
        if config.competition:
            m = torch.empty(self.num_experts, self.num_experts).uniform_(-0.1, 0.1, generator=generator)
            self.competition = self._param(m.fill_diagonal_(0.0))
        else:
            self.competition = None

    def _shares(self, probs: torch.Tensor) -> torch.Tensor:
        """w / k = v / total from router probabilities phi (N, k), float32 (see module doc)."""
        v = probs if self.competition is None else torch.addmm(probs, probs, as_float32(self.competition))
        if self.expert_mask is not None and self.competition is not None:
            v = v.masked_fill(self.expert_mask, 0.0)  # removed experts get no weight through M (routed.py)
        if self.config.competition_norm == "reference":
            return v / v.sum(-1, keepdim=True)
        return v / torch.linalg.vector_norm(v, ord=1, dim=-1, keepdim=True).clamp_min(L1_GUARD)

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """w from router probabilities phi (N, k), float32; entries sum to k (see module doc)."""
        return self._shares(probs) * self.num_experts

    def routed_forward(self, x: torch.Tensor, groups, mask, replay: bool) -> torch.Tensor:
        result = self.base_layer(x)
        xa = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        k, r_b = self.num_experts, self.expert_rank
        # two GEMMs, not one for [A; R]: concatenating A and R costs a copy of A per call
        z, logits = F.linear(xa, self.lora_A), F.linear(xa, self.router)
        probs = self.router_probs(logits.reshape(-1, k), groups)
        shares = self._shares(probs)
        self._observe(probs, shares * k if self._wants_weights() else None, groups, mask, replay)
        if shares.dtype != z.dtype:
            shares = shares.to(z.dtype)
        if not self._fused:
            z = self.scaling * z.reshape(-1, k * r_b)
            for i in range(k):
                cols = slice(i * r_b, (i + 1) * r_b)
                h_i = F.linear(self._drop(z[:, cols]), self.lora_B[:, cols])
                result = result + (k * shares[:, i : i + 1] * h_i).view_as(result).to(result.dtype)
            return result
        # w_i / k scales chunk i of A x (r_b columns); k s rides on the last GEMM
        zw = self._drop(z).reshape(-1, k, r_b) * shares.unsqueeze(-1)
        return self._add_update(result, zw.view(-1, k * r_b), self.lora_B, alpha=k * self.scaling)

    def delta_weight(self, expert_weights) -> torch.Tensor:
        """s * [B_1 ... B_k] diag(repeat_interleave(w, r_b)) A for fixed weights w (sum k = uniform ones)."""
        w = fixed_expert_weights(expert_weights, self.num_experts, self.lora_B.device).repeat_interleave(self.expert_rank)
        return self.scaling * (self.lora_B.float() * w) @ self.lora_A.float()
