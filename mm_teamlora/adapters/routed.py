"""Routed adapter layers: the shared router plumbing, MoELoRA and HydraLoRA.

Every routed layer has a dense per-token router `phi(x) = softmax(R x + g[group])`, `R (k x d_in)`
Kaiming-uniform, no bias, and (with `group_routing`) a learned per-group logit bias `g`, zero at
init so routing starts exactly as the paper's. Router maths runs in float32.

After each forward a routed layer keeps its load-balancing loss (masked to real tokens):
    usage_e = mean over real tokens of w_e,   loss = mean_e (usage_e - mean_e' usage_e')^2
and, inside `record_routing`, adds its probabilities and weights to the recorder. For checkpoint
replays it keeps the groups and mask it used (see adapters.routing), never the routing context.

MoELoRA (Liu et al. 2023), as published: k independent rank-(r/k) LoRAs, `w = phi` (sums to 1),
    y = base(x) + (alpha / r) * sum_i w_i B_i A_i dropout(x).
HydraLoRA (Tian et al. 2024): one shared `A (r x d_in)`, k full-rank `B_i (d_out x r)`,
    y = base(x) + (alpha / r) * sum_i w_i B_i A dropout(x).
The A_i of MoELoRA are stored stacked as one `lora_A (r x d_in)` and the B_i side by side as one
`lora_B`, so `fused` runs one GEMM per side; `loop` runs one matmul per expert (MoELoRA's
published form, which also draws dropout per expert; fused and loop agree exactly at dropout 0).

Expert masks (`layer.set_expert_mask`, or `masking.masked_experts` for a model's layers): a set
`S` of experts is removed from a layer as if it had been built without them, and the layer's own
normalisation is kept over the rest, so the adapter's total gain stays that of the trained model
(zeroing weights without renormalising would shrink the whole update as well, confounding "these
experts' knowledge" with "a smaller update"; TEAMLORA.md 4b). With `keep_i = 0` for `i in S`, else 1:
    phi' = softmax(R x [+ g] with the logits of S at -inf)  = phi * keep / sum_j phi_j keep_j
    MoELoRA, HydraLoRA:  w' = phi'                              (sums to 1 over the kept experts)
    TeamLoRA:            v' = keep * (phi' (I + M)),  w' = k v' / sum(v')  or  k v' / max(|v'|_1, eps)
(TeamLoRA masks after the competition too: through M a kept expert's phi would otherwise give the
removed ones weight). Masking nothing is the identity; keeping one expert j forces it: w' = e_j for
the softmax methods, w' = k e_j for TeamLoRA (when 1 + M_jj > 0). At least one expert must stay.
The recorder and the balance loss see phi' and w'. A mask is an attribute of the layer (not part
of its state dict), read by every forward until cleared; it knows nothing of what the tokens are.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .lora import AdapterLayer, kaiming_uniform
from .routing import LayerRoutingStats, current_routing, in_backward


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32; a float32 t as it is, without the dispatch of a no-op `.float()` (a decode
    step runs every adapted layer on a handful of tokens, where dispatches cost more than maths)."""
    return t if t.dtype == torch.float32 else t.float()


def balance_loss(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Spread of mean expert usage over the real tokens: weights (N, k), mask (N,) or None."""
    if mask is None:
        usage = weights.mean(0)
    else:
        real = mask.to(weights.dtype)
        usage = (weights * real[:, None]).sum(0) / real.sum().clamp_min(1.0)
    return (usage - usage.mean()).pow(2).mean()


class RoutedAdapterLayer(AdapterLayer):
    """Router, routing inputs, balance loss and recording shared by the routed methods."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base_layer, config)
        self.num_experts = k = config.num_experts
        self.router = self._param(kaiming_uniform((k, self.in_features), self.in_features, generator))
        self.group_bias = self._param(torch.zeros(config.num_token_groups, k)) if config.group_routing else None
        self.balance_loss: torch.Tensor | None = None
        self.recorder: LayerRoutingStats | None = None
        self.expert_mask: torch.Tensor | None = None  # bool (k,): True = expert removed (set_expert_mask)
        # groups and mask of the last forward, for a checkpoint replay: a weak reference to what
        # that forward's autograd graph holds, or (no graph) the tensors until a replay uses them
        self._replay: weakref.ref | _ReplayRouting | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, mask, replay = self._routing_inputs(x)
        out = self.routed_forward(x, groups, mask, replay)
        if not replay:
            self._keep_for_replay(out, groups, mask)
        return out

    def routed_forward(self, x: torch.Tensor, groups, mask, replay: bool) -> torch.Tensor:  # pragma: no cover
        """The method's forward, given the (N,) groups and mask (or None) of x's N tokens."""
        raise NotImplementedError

    def _routing_inputs(self, x: torch.Tensor):
        """(groups, mask, replay): groups and mask (N,) or None for the N tokens of x, and whether
        this call is a checkpoint replay inside backward (where, without a context, the layer's
        kept inputs serve)."""
        replay = in_backward()
        inputs = current_routing()
        if inputs is not None:
            return (*inputs.for_tokens(x.shape[:-1], x.device), replay)
        if replay:
            kept = self._replay
            if isinstance(kept, weakref.ref):
                kept = kept()
            elif kept is not None:
                self._replay = None  # held without a graph: it serves the one replay of that forward
            if kept is not None:
                return kept.groups, kept.mask, replay
        return None, None, replay

    def _keep_for_replay(self, out: torch.Tensor, groups, mask) -> None:
        """What a checkpoint replay of this forward needs without a context: attached to the
        output's autograd node (it goes with the graph) and weakly referenced here; a training-mode
        forward without a graph (reentrant checkpointing's first pass) holds it here."""
        kept = None
        if groups is not None or mask is not None:
            if out.grad_fn is not None:
                routing = _ReplayRouting(groups, mask)
                out.grad_fn.metadata["mm_teamlora_routing"] = routing
                kept = weakref.ref(routing)
            elif self.training and not torch.is_inference_mode_enabled():
                kept = _ReplayRouting(groups, mask)
        if kept is not None or self._replay is not None:
            self._replay = kept

    def router_probs(self, logits: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """phi = softmax(R x [+ g[group]]) in float32; logits (N, k). Masked experts (see the
        module doc) get probability 0 and the rest are renormalised."""
        logits = as_float32(logits)
        if self.group_bias is not None and groups is not None:
            logits = logits + as_float32(self.group_bias)[groups]
        if self.expert_mask is not None:
            logits = logits.masked_fill(self.expert_mask, float("-inf"))
        return logits.softmax(-1)

    def set_expert_mask(self, experts) -> None:
        """Remove `experts` from this layer's forwards (see the module doc) until cleared with None:
        expert indices (e.g. [0, 2]) or a bool sequence / tensor of length k (True: removed)."""
        if experts is None:
            self.expert_mask = None
            return
        k = self.num_experts
        given = torch.as_tensor(experts)
        if given.dtype == torch.bool:
            if given.shape != (k,):
                raise ValueError(f"an expert mask of a {k}-expert layer must have {k} entries, got shape "
                                 f"{tuple(given.shape)}")
            mask = given.clone()
        else:
            if given.numel() and (given.dtype.is_floating_point or given.dim() > 1):
                raise ValueError(f"experts must be integer indices or a bool mask, got {experts!r}")
            index = given.long().flatten()
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= k):
                raise ValueError(f"expert indices must lie in [0, {k}), got {index.tolist()}")
            mask = torch.zeros(k, dtype=torch.bool)
            mask[index] = True
        if bool(mask.all()):
            raise ValueError(f"cannot mask all {k} experts of a layer: at least one must remain")
        self.expert_mask = mask.to(self.router.device)

    def _wants_weights(self) -> bool:
        """Whether this forward's expert weights are observed: a balance loss under grad, or a recorder."""
        return self.recorder is not None or (self.config.balance_weight > 0 and torch.is_grad_enabled())

    def _observe(self, probs: torch.Tensor, weights: torch.Tensor | None, groups, mask, replay: bool) -> None:
        """Keep the balance loss of this forward; feed the recorder (`weights` is None where
        `_wants_weights` is False). A checkpoint replay computes the loss again (non-reentrant
        checkpointing checks that it saves the same tensors) but keeps nothing."""
        wants_loss = self.config.balance_weight > 0
        if wants_loss and self.training and not torch.is_grad_enabled():
            _warn_once("balance loss not computed: a training-mode forward ran without grad. If this "
                       "is reentrant gradient checkpointing, the balance loss cannot flow through it; "
                       "use use_reentrant=False")
        loss = balance_loss(weights, mask) if wants_loss and torch.is_grad_enabled() else None
        if replay:
            return
        if loss is not None or self.balance_loss is not None:
            self.balance_loss = loss
        if self.recorder is not None:
            self.recorder.add(probs.detach(), weights.detach(), groups, mask)

    def _softmax_route(self, x: torch.Tensor, groups, mask, replay: bool):
        """For methods whose expert weights are the router probabilities (MoELoRA, HydraLoRA):
        the base output, x in the adapter dtype, and phi (N, k), observed as the weights."""
        result = self.base_layer(x)
        xa = x.to(self.lora_A.dtype)
        probs = self.router_probs(F.linear(xa, self.router).reshape(-1, self.num_experts), groups)
        self._observe(probs, probs, groups, mask, replay)
        return result, xa, probs

    def extra_repr(self) -> str:
        return super().extra_repr() + f", experts={self.num_experts}, group_routing={self.group_bias is not None}"


class MoELoRALinear(RoutedAdapterLayer):
    """MoELoRA: k rank-(r/k) LoRAs mixed by softmax router weights, scaling alpha / r."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base_layer, config, generator)
        self.expert_rank = config.expert_rank
        self.lora_A = self._param(kaiming_uniform((config.r, self.in_features), self.in_features, generator))
        self.lora_B = self._param(torch.zeros(self.out_features, config.r))

    def routed_forward(self, x: torch.Tensor, groups, mask, replay: bool) -> torch.Tensor:
        result, xa, probs = self._softmax_route(x, groups, mask, replay)
        scale = (probs * self.scaling).to(xa.dtype).view(*x.shape[:-1], self.num_experts)
        if self.config.implementation == "loop":
            # the published structure: each expert is its own LoRA, with its own dropout draw,
            # and its d_out-wide output is scaled by s * w_i
            for i in range(self.num_experts):
                rows = slice(i * self.expert_rank, (i + 1) * self.expert_rank)
                h_i = F.linear(F.linear(self._drop(xa), self.lora_A[rows]), self.lora_B[:, rows])
                result = result + (h_i * scale[..., i : i + 1]).to(result.dtype)
            return result
        z = F.linear(self._drop(xa), self.lora_A).unflatten(-1, (self.num_experts, self.expert_rank))
        return self._add_update(result, (z * scale.unsqueeze(-1)).flatten(-2), self.lora_B)

    def delta_weight(self, expert_weights) -> torch.Tensor:
        w = fixed_expert_weights(expert_weights, self.num_experts, self.lora_B.device).repeat_interleave(self.expert_rank)
        return self.scaling * (self.lora_B.float() * w) @ self.lora_A.float()


class HydraLoRALinear(RoutedAdapterLayer):
    """HydraLoRA: shared rank-r A, k full-rank B's mixed by softmax weights, scaling alpha / r."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, generator: torch.Generator):
        super().__init__(base_layer, config, generator)
        self.lora_A = self._param(kaiming_uniform((config.r, self.in_features), self.in_features, generator))
        # [B_1 ... B_k] side by side: expert i owns columns i*r .. (i+1)*r
        self.lora_B = self._param(torch.zeros(self.out_features, self.num_experts * config.r))

    def routed_forward(self, x: torch.Tensor, groups, mask, replay: bool) -> torch.Tensor:
        result, xa, probs = self._softmax_route(x, groups, mask, replay)
        z = F.linear(self._drop(xa), self.lora_A) * self.scaling
        scale = probs.to(z.dtype).view(*x.shape[:-1], self.num_experts)
        r = self.config.r
        if self.config.implementation == "loop":
            for i in range(self.num_experts):
                h_i = F.linear(z, self.lora_B[:, i * r : (i + 1) * r]) * scale[..., i : i + 1]
                result = result + h_i.to(result.dtype)
            return result
        # sum_i w_i B_i z = [B_1 ... B_k] (w (x) z): one r*k -> d_out GEMM
        zw = (scale.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
        return self._add_update(result, zw, self.lora_B)

    def delta_weight(self, expert_weights) -> torch.Tensor:
        w = fixed_expert_weights(expert_weights, self.num_experts, self.lora_B.device).repeat_interleave(self.config.r)
        return self.scaling * (self.lora_B.float() * w) @ self.lora_A.float().repeat(self.num_experts, 1)


class _ReplayRouting:
    """The groups and mask a forward used, kept for its checkpoint replay."""

    __slots__ = ("groups", "mask", "__weakref__")

    def __init__(self, groups: torch.Tensor | None, mask: torch.Tensor | None):
        self.groups, self.mask = groups, mask


def fixed_expert_weights(expert_weights, k: int, device: torch.device) -> torch.Tensor:
    w = torch.as_tensor(expert_weights, dtype=torch.float32, device=device).flatten()
    if w.numel() != k or not torch.isfinite(w).all():
        raise ValueError(f"expert_weights must be {k} finite numbers, got {expert_weights!r}")
    return w
