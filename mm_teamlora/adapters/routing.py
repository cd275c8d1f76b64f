"""How callers hand per-token routing inputs to every adapter layer, and how routing is recorded.

`routing_context(token_groups, token_mask)` is the one channel: an integer group id per token and a
mask of real (non-padding) tokens, visible to every adapter layer for the forwards run inside the
`with` block. It is a `contextvars.ContextVar`, so it never leaks across threads or past the block.

Gradient checkpointing replays a layer's forward during backward, usually after the block has
closed and, on GPUs, on an autograd worker thread where the context variable is not visible. Each
adapter layer therefore keeps the `RoutingInputs` of its last ordinary forward and uses them when
it is replayed inside backward. That is exact for the usual forward -> backward order; to be exact
for any order (several forwards before one backward), pass `checkpoint_context_fn` to
`torch.utils.checkpoint` (for HF models: `activation_checkpointing_kwargs={"use_reentrant": False,
"context_fn": checkpoint_context_fn}`), which re-enters the forward's context for the replay.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch

_CURRENT: ContextVar["RoutingInputs | None"] = ContextVar("mm_teamlora_routing", default=None)


def in_backward() -> bool:
    """True while autograd runs a backward node: a checkpointed forward being replayed."""
    return torch._C._current_autograd_node() is not None


@dataclass(eq=False)
class RoutingInputs:
    """Per-token routing inputs, shaped like the token grid (batch, seq) the caller runs."""

    token_groups: torch.Tensor | None = None  # integer ids in [0, num_token_groups)
    token_mask: torch.Tensor | None = None  # True for real tokens, False for padding
    # state an adapter layer keeps for the length of this context (key: the layer), e.g. the
    # matrices of TeamLoRA's inference form; it goes when the context object does
    layer_state: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> torch.Size:
        ref = self.token_groups if self.token_groups is not None else self.token_mask
        return ref.shape

    def for_tokens(self, lead_shape: torch.Size, device: torch.device):
        """Groups and mask flattened to the N = prod(lead_shape) tokens of a layer's input.

        A call shorter than the context (KV-cache decoding under a context set for the whole
        prompt) gets, per row, the group of that row's last real token, and all its tokens count
        as real: new tokens continue the sample the prompt started.
        """
        key = (tuple(lead_shape), device)
        if key not in self._cache:
            self._cache[key] = self._resolve(tuple(lead_shape), device)
        return self._cache[key]

    def _resolve(self, lead_shape: tuple, device: torch.device):
        groups, mask = self.token_groups, self.token_mask
        n = math.prod(lead_shape)
        if tuple(self.shape) == lead_shape or (len(lead_shape) == 1 and self.shape.numel() == n):
            flat = lambda t: None if t is None else t.reshape(-1).to(device)  # noqa: E731
            return flat(groups), flat(mask)
        ctx_batch, ctx_len = self.shape[0], self.shape[-1]
        if len(lead_shape) == 2 and lead_shape[0] == ctx_batch and lead_shape[1] < ctx_len:
            if groups is not None:
                if mask is not None:
                    positions = torch.arange(1, ctx_len + 1, device=mask.device)
                    last = (mask.long() * positions).argmax(-1)
                else:
                    last = torch.full((ctx_batch,), ctx_len - 1, device=groups.device)
                row_group = groups.gather(1, last[:, None].to(groups.device))
                groups = row_group.expand(lead_shape).reshape(-1).to(device)
            return groups, None
        raise ValueError(
            f"routing_context was set for token grid {tuple(self.shape)} but an adapter layer got "
            f"input with leading shape {lead_shape}; pass token_groups/token_mask shaped like the "
            f"model's (batch, seq) input"
        )


@contextlib.contextmanager
def routing_context(
    token_groups: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
) -> Iterator[RoutingInputs]:
    """Make `token_groups` (integer, (batch, seq)) and `token_mask` (bool, (batch, seq), True for
    real tokens) visible to every adapter layer for the forwards inside the block. Nests: an inner
    block overrides, and the outer one is back on exit. Nothing remains after the block."""
    if token_groups is not None:
        if not isinstance(token_groups, torch.Tensor) or token_groups.dtype.is_floating_point or token_groups.dtype == torch.bool:
            raise TypeError(f"token_groups must be an integer tensor, got {_describe(token_groups)}")
        if token_groups.numel() and int(token_groups.min()) < 0:
            raise ValueError("token_groups holds negative ids; group ids start at 0")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask must be a tensor, got {_describe(token_mask)}")
        if token_mask.dtype != torch.bool:
            if token_mask.dtype.is_floating_point or not bool(((token_mask == 0) | (token_mask == 1)).all()):
                raise TypeError(f"token_mask must be bool or 0/1 integers, got {_describe(token_mask)}")
            token_mask = token_mask.bool()
    if token_groups is not None and token_mask is not None and token_groups.shape != token_mask.shape:
        raise ValueError(f"token_groups {tuple(token_groups.shape)} and token_mask {tuple(token_mask.shape)} differ in shape")
    inputs = None if token_groups is None and token_mask is None else RoutingInputs(token_groups, token_mask)
    with _entered(inputs):
        yield inputs


@contextlib.contextmanager
def _entered(inputs: RoutingInputs | None) -> Iterator[None]:
    token = _CURRENT.set(inputs)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_routing() -> RoutingInputs | None:
    """The routing inputs of the innermost active `routing_context`, or None."""
    return _CURRENT.get()


def checkpoint_context_fn():
    """`context_fn` for `torch.utils.checkpoint` (non-reentrant): the replay in backward runs
    inside the routing context that was active when the forward ran."""
    return contextlib.nullcontext(), _entered(_CURRENT.get())


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype}"
    return type(value).__name__


class LayerRoutingStats:
    """Routing of one adapted layer, accumulated per token group over real tokens only."""

    def __init__(self, num_groups: int, num_experts: int, device: torch.device):
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.tokens = zeros(num_groups)
        self.router_prob_sum = zeros(num_groups, num_experts)  # sum of softmax probabilities phi
        self.weight_sum = zeros(num_groups, num_experts)  # sum of the expert weights w applied
        self.top1_count = zeros(num_groups, num_experts)  # tokens whose largest phi is expert e

    @torch.no_grad()
    def add(self, probs, weights, groups, mask) -> None:
        n = probs.shape[0]
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long, device=probs.device)
        real = torch.ones(n, dtype=torch.float64, device=probs.device) if mask is None else mask.double()
        groups = groups.to(probs.device).long()
        self.tokens.index_add_(0, groups, real)
        self.router_prob_sum.index_add_(0, groups, probs.double() * real[:, None])
        self.weight_sum.index_add_(0, groups, weights.double() * real[:, None])
        top1 = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).double()
        self.top1_count.index_add_(0, groups, top1 * real[:, None])

    def summary(self) -> dict:
        """Per group: token count, mean router probabilities, mean expert weights, top-1 shares."""
        out = {}
        for g in range(self.tokens.shape[0]):
            n = float(self.tokens[g])
            if n == 0:
                continue
            out[g] = {
                "tokens": int(round(n)),
                "mean_router_prob": (self.router_prob_sum[g] / n).tolist(),
                "mean_weight": (self.weight_sum[g] / n).tolist(),
                "top1_share": (self.top1_count[g] / n).tolist(),
            }
        return out


@dataclass
class RoutingRecord:
    """What `record_routing` collected: one `LayerRoutingStats` per adapted layer name."""

    layers: dict[str, LayerRoutingStats] = field(default_factory=dict)

    def summary(self) -> dict:
        return {name: stats.summary() for name, stats in self.layers.items()}

    def separation(self, group_a: int, group_b: int) -> dict[str, float]:
        """Per layer, the Jensen-Shannon divergence (bits, in [0, 1]) between the mean router
        distributions of two token groups: 0 when they route alike, 1 when to disjoint experts."""
        out = {}
        for name, stats in self.layers.items():
            if stats.tokens[group_a] > 0 and stats.tokens[group_b] > 0:
                p = stats.router_prob_sum[group_a] / stats.tokens[group_a]
                q = stats.router_prob_sum[group_b] / stats.tokens[group_b]
                out[name] = js_divergence(p, q)
        return out


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions over the same experts."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        nonzero = a > 0
        return (a[nonzero] * (a[nonzero] / m[nonzero]).log2()).sum()

    return float((kl(p) + kl(q)) / 2)
