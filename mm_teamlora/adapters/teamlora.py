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

Generation (eval mode, no grad, no recorder) runs the fused maths in fewer ops, with matrices kept
for the length of one routing context (`_forward_inference`): a decode step is many layers on a
handful of tokens, where each op costs more than its arithmetic. In float32 on CPU a layer's whole
update is one compiled call (`kernels.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import AdapterConfig
from .lora import kaiming_uniform
from .routed import RoutedAdapterLayer, fixed_expert_weights
from .routing import RoutingInputs, current_routing

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

    def _interaction(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v = phi (I + M) and the normaliser `total` of w = k v / total (see module doc)."""
        v = probs if self.competition is None else torch.addmm(probs, probs, self.competition.float())
        if self.config.competition_norm == "reference":
            return v, v.sum(-1, keepdim=True)
        return v, torch.linalg.vector_norm(v, ord=1, dim=-1, keepdim=True).clamp_min(L1_GUARD)

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """w from router probabilities phi (N, k), float32; entries sum to k (see module doc)."""
        v, total = self._interaction(probs)
        return v * (self.num_experts / total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or self.recorder is not None or not self._fused:
            return self._forward_observed(x)
        plan = self._inference_plan(current_routing())
        return self._forward_observed(x) if plan is None else self._forward_inference(x, plan)

    def _forward_observed(self, x: torch.Tensor) -> torch.Tensor:
        """The training form (also eval with grad, under the recorder, and the loop form): keeps
        the balance loss and feeds the recorder."""
        result = self.base_layer(x)
        groups, mask, replay = self._routing_inputs(x)
        xa = x.to(self.lora_A.dtype)
        r, k = self.config.r, self.num_experts
        if self._fused:
            z, logits = F.linear(xa, torch.cat([self.lora_A, self.router])).split([r, k], dim=-1)
        else:
            z, logits = F.linear(xa, self.lora_A), F.linear(xa, self.router)
        probs = self.router_probs(logits.reshape(-1, k), groups)
        v, total = self._interaction(probs)
        self._observe(probs, v * (k / total), groups, mask, replay)
        # w_i = k v_i / total and s both scale chunk i: fold them into one (N, k) factor, not (N, r)
        scale = (v * ((k * self.scaling) / total)).to(z.dtype).view(*x.shape[:-1], k)
        if not self._fused:
            for i in range(k):
                cols = slice(i * self.expert_rank, (i + 1) * self.expert_rank)
                h_i = F.linear(self._drop(z[..., cols]), self.lora_B[:, cols])
                result = result + (h_i * scale[..., i : i + 1]).to(result.dtype)
            return result
        z = self._drop(z).unflatten(-1, (k, self.expert_rank)) * scale.unsqueeze(-1)
        return self._add_update(result, z.flatten(-2), self.lora_B)

    def _forward_inference(self, x: torch.Tensor, plan: _InferencePlan) -> torch.Tensor:
        """The same maths in the fewest ops, for generation (eval, no grad, no recorder). A decode
        step runs every adapted layer on a handful of tokens, where each op costs more than its
        arithmetic, so two GEMMs with cached matrices do the routing. With E (k x r) sending
        expert i to its r_b columns and C = I + M, q = rep(v) = phi C E has |q|_1 = r_b |v|_1:
            [z, logits] = x [A; R]^T                       (logits += g[group], in float32)
            update      = c z * q / max(|q|_1, r_b eps)    (`reference`: / sum(q)),  c = r_b k s
        which is k s z * rep(v) / max(|v|_1, eps) = s z * rep(w), the module doc's update.
        Where the normaliser is provably the sum, it is linear in phi and folds into the
        softmax (the closed form, see `_InferencePlan.build`): with s_j the row sums of C,
            update = c' z * (softmax(logits + log s) D^-1 C E),   D = diag(s),  c' = k s
        The factor rides on the last GEMM (its alpha), so no low-precision tensor grows by it."""
        result = self.base_layer(x)
        if self.balance_loss is not None:
            self.balance_loss = None  # nothing to observe in an inference forward
        h = x.reshape(-1, self.in_features)
        if h.dtype != plan.dtype:
            h = h.to(plan.dtype)
        bias = plan.bias(x.shape[:-1], x.device)
        if plan.kernel is not None and result.dtype == torch.float32 and result.is_contiguous():
            # float32 on CPU: both GEMMs and the routing in one compiled call (kernels.py)
            out = plan.kernel.add_update(result.view(-1, result.shape[-1]), h, plan.down_t, bias, plan.mix,
                                         self.lora_B, *plan.kernel_args, plan.scale)
            return out.view(result.shape)
        if bias is not None and plan.bias_on_gemm:
            z_logits = torch.addmm(bias, h, plan.down_t)
        else:
            z_logits = torch.mm(h, plan.down_t)
        # split_with_sizes, not Tensor.split: the same views without a Python-level wrapper
        z, logits = z_logits.split_with_sizes(plan.split, dim=-1)
        if bias is not None and not plan.bias_on_gemm:
            logits = logits.float() + bias  # router maths in float32, as in the training form
        q = logits.softmax(-1, dtype=torch.float32) @ plan.mix
        update = z * q  # float32 for a low-precision z: one rounding, just below
        if plan.norm is not None:
            total = q.sum(-1, keepdim=True) if plan.norm == "reference" else torch.linalg.vector_norm(q, 1, -1, keepdim=True)
            update = update.div_(total if plan.eps is None else total.clamp_min_(plan.eps))
        if update.dtype != plan.dtype:
            update = update.to(plan.dtype)
        return self._add_update(result, update.view(*x.shape[:-1], self.config.r), self.lora_B, alpha=plan.scale)

    def _inference_plan(self, inputs: RoutingInputs | None) -> _InferencePlan | None:
        """The matrices of `_forward_inference`, kept in the routing context (one generation, one
        evaluation batch), so they go with it, and rebuilt within it if a parameter is replaced
        or bumps its version or storage. Not kept across contexts: DeepSpeed's all-gathers and
        `p.data.copy_` change parameters without a version bump (within one context, such
        changes are not seen). Without a context nothing is kept. None where parameters have no
        version or storage (built under inference_mode, or inside torch.func transforms): the
        training form runs instead."""
        try:
            versions = [(id(p), p._version, p.data_ptr()) for p in self._parameters.values()]
        except RuntimeError:
            return None
        if inputs is None:
            return _InferencePlan.build(self, None, versions)
        plan = inputs.layer_state.get(self)
        if plan is None or plan.versions != versions:
            inputs.layer_state[self] = plan = _InferencePlan.build(self, inputs, versions)
        return plan

    def delta_weight(self, expert_weights) -> torch.Tensor:
        """s * [B_1 ... B_k] diag(repeat_interleave(w, r_b)) A for fixed weights w (sum k = uniform ones)."""
        w = fixed_expert_weights(expert_weights, self.num_experts, self.lora_B.device).repeat_interleave(self.expert_rank)
        return self.scaling * (self.lora_B.float() * w) @ self.lora_A.float()


# The closed form needs every row sum of I + M at least this large: far above the l1 guard, and
# D^-1 stays moderate (a row sum near 0 is where the reference normalisation itself blows up).
CLOSED_FORM_MIN_ROW_SUM = 1e-3
# A plan keeps the logit bias of token grids up to this size (decode steps), not a long prefill's.
KEPT_BIAS_MAX_TOKENS = 256


@dataclass(eq=False)
class _InferencePlan:
    """What `TeamLoRALinear._forward_inference` needs besides x, built under no grad for one
    routing context and one set of parameter versions."""

    versions: list  # (identity, version, storage) of every parameter
    dtype: torch.dtype
    down_t: torch.Tensor  # [A; R]^T, (d_in, r + k)
    split: tuple[int, int]  # (r, k)
    mix: torch.Tensor  # (k, r) float32: C E, or D^-1 C E in the closed form
    norm: str | None  # "l1" or "reference": q is divided by its norm; None: the closed form
    eps: float | None  # r_b times the l1 guard, None where the guard provably never binds
    scale: float  # alpha of the last GEMM: r_b k s, or k s in the closed form
    logit_shift: torch.Tensor | None  # log s (k,) float32 in the closed form
    inputs: RoutingInputs | None
    group_bias: torch.Tensor | None  # g in float32, when routing uses groups and the context gives them
    kernel: object | None  # the compiled update (kernels.py), for float32 on CPU
    kernel_args: tuple[int, float]  # its (mode, eps): 0 closed form, 1 l1, 2 reference; eps < 0: no guard
    biases: dict = field(default_factory=dict)  # token grid -> logit bias of its tokens

    @property
    def bias_on_gemm(self) -> bool:
        """float32 logits take their bias inside the [A; R] GEMM (addmm); others add it in float32."""
        return self.dtype == torch.float32

    def bias(self, lead: torch.Size, device: torch.device) -> torch.Tensor | None:
        """The logits' bias g[group] + log s for the tokens of a call, (N, k) or (k,); zero-padded
        over z's columns when it rides on the GEMM. Kept for token grids of up to
        `KEPT_BIAS_MAX_TOKENS` (decode steps); a prefill's is built per call, so a context does not
        hold an (N, r + k) tensor per layer."""
        if lead in self.biases:
            return self.biases[lead]
        bias = self.logit_shift
        if self.group_bias is not None:
            groups, _ = self.inputs.for_tokens(lead, device)
            bias = self.group_bias[groups] if bias is None else self.group_bias[groups] + bias
        if bias is not None and self.bias_on_gemm:
            bias = F.pad(bias, (self.split[0], 0))
        if math.prod(lead) <= KEPT_BIAS_MAX_TOKENS:
            self.biases[lead] = bias
        return bias

    @staticmethod
    @torch.no_grad()
    def build(layer: TeamLoRALinear, inputs: RoutingInputs | None, versions: list) -> _InferencePlan:
        """Chooses the closed form where the normaliser of v = phi C is provably its sum phi . s
        (s_j = sum_i C_ji): for `reference` when every s_j > 0; for `l1` when moreover C >= 0,
        so v >= 0. Then v / (phi . s) = softmax(logits + log s) D^-1 C: phi_j s_j / (phi . s) is
        the softmax of the shifted logits, and the division becomes a bias. Otherwise q is
        divided by its norm; the l1 guard is kept only where it can bind: |v|_1 >= phi . s >=
        min_j s_j."""
        a, k, r_b = layer.lora_A, layer.num_experts, layer.expert_rank
        interaction = torch.eye(k, device=a.device, dtype=torch.float32)
        if layer.competition is not None:
            interaction = interaction + layer.competition.float()
        row_sums = interaction.sum(1)
        positive_sums = bool(row_sums.min() >= CLOSED_FORM_MIN_ROW_SUM)
        reference = layer.config.competition_norm == "reference"
        closed = positive_sums and (reference or bool(interaction.min() >= 0))
        if closed:
            norm, eps, scale = None, None, k * layer.scaling
            mix = interaction / row_sums[:, None]
            shift = None if layer.competition is None else row_sums.log()  # log 1 = 0: no shift
        else:
            norm, scale, mix, shift = layer.config.competition_norm, r_b * k * layer.scaling, interaction, None
            eps = None if reference or positive_sums else r_b * L1_GUARD
        grouped = layer.group_bias is not None and inputs is not None and inputs.token_groups is not None
        kernel = kernels.cpu_route_kernel() if a.device.type == "cpu" and a.dtype == torch.float32 else None
        return _InferencePlan(
            versions, a.dtype, torch.cat([a, layer.router]).t(), (layer.config.r, k),
            mix.repeat_interleave(r_b, dim=1).contiguous(), norm, eps, scale, shift, inputs,
            layer.group_bias.detach().float() if grouped else None,
            kernel, ({None: 0, "l1": 1, "reference": 2}[norm], -1.0 if eps is None else eps))
