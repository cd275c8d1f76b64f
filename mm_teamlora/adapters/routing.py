"""How callers hand per-token routing inputs to every adapter layer, and how routing is recorded.

`routing_context(token_groups, token_mask)` is the one channel: an integer group id per token and a
mask of real (non-padding) tokens, shaped like the (batch, seq) token grid of the forwards run
inside the `with` block, visible to every adapter layer there (an input of another token grid is an
error). It is a `contextvars.ContextVar`, so it never leaks across threads or past the block, and it
carries nothing else.

Generation: `generation_routing(model, token_groups, token_mask, new_token_groups)`, around one
`model.generate(...)` call, sets the routing inputs of every forward of `model` inside the block
explicitly (a forward pre-hook, removed at exit), by these rules:
- a prompt token takes its entry of `token_groups` / `token_mask` (shaped like the prompt);
- rows that `generate` expands (beams, `num_return_sequences`: prompt row i becomes rows
  i*n ... i*n + n - 1, as Hugging Face's `repeat_interleave` lays them out) take their source row's;
- every generated token takes its row's entry of `new_token_groups` and counts as real.
A forward's tokens follow the `cache.get_seq_length()` tokens its KV cache already holds (none
without a cache), so prefill, decode steps, a chunked prefill and uncached generation all place
their tokens exactly; nothing is inferred from tensor shapes.

Gradient checkpointing replays a layer's forward during backward, after the block has closed and,
on GPUs, maybe on an autograd worker thread where the context variable is not visible:
- with `checkpoint_context_fn` as `torch.utils.checkpoint`'s `context_fn` (non-reentrant; for HF
  models `activation_checkpointing_kwargs={"use_reentrant": False, "context_fn":
  checkpoint_context_fn}`) the replay re-enters the forward's context: exact for any order of
  forwards and backwards;
- without it, each routed layer keeps the groups and mask (tensors, not the context object) its
  last forward used: in that forward's autograd graph, so they go with the graph, or, for a
  training-mode forward without grad (reentrant checkpointing's first pass), in the layer until the
  replay that uses them. Exact for the usual forward -> backward order.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

_CURRENT: ContextVar["RoutingInputs | None"] = ContextVar("mm_teamlora_routing", default=None)


def in_backward() -> bool:
    """True while autograd runs a backward node: a checkpointed forward being replayed."""
    return torch._C._current_autograd_node() is not None


@dataclass(eq=False)
class RoutingInputs:
    """Per-token routing inputs of one token grid (batch, seq): groups, mask, either may be None."""

    token_groups: torch.Tensor | None = None  # integer ids in [0, num_token_groups)
    token_mask: torch.Tensor | None = None  # True for real tokens, False for padding

    def __post_init__(self):
        # both flattened once here, not in each of a forward's adapter layers
        self._flat = tuple(None if t is None else t.reshape(-1) for t in (self.token_groups, self.token_mask))

    @property
    def shape(self) -> torch.Size:
        ref = self.token_groups if self.token_groups is not None else self.token_mask
        return ref.shape

    def for_tokens(self, lead_shape: torch.Size, device: torch.device):
        """Groups and mask, each (N,) or None, for the N tokens of a layer input whose leading
        shape is the context's token grid (or that grid flattened)."""
        shape = self.shape
        if lead_shape != shape and not (len(lead_shape) == 1 and lead_shape[0] == shape.numel()):
            raise ValueError(
                f"routing_context was set for token grid {tuple(shape)} but an adapter layer got input "
                f"with leading shape {tuple(lead_shape)}; pass token_groups/token_mask shaped like the "
                f"model's (batch, seq) input (around `generate`, use generation_routing)")
        groups, mask = self._flat
        if groups is not None and groups.device != device:
            groups = groups.to(device)
        if mask is not None and mask.device != device:
            mask = mask.to(device)
        return groups, mask


def _checked(token_groups, token_mask) -> RoutingInputs | None:
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
    return None if token_groups is None and token_mask is None else RoutingInputs(token_groups, token_mask)


@contextlib.contextmanager
def routing_context(
    token_groups: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
) -> Iterator[RoutingInputs]:
    """Make `token_groups` (integer, (batch, seq)) and `token_mask` (bool, (batch, seq), True for
    real tokens) visible to every adapter layer for the forwards inside the block. Nests: an inner
    block overrides, and the outer one is back on exit. Nothing remains after the block."""
    inputs = _checked(token_groups, token_mask)
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


@contextlib.contextmanager
def generation_routing(model: nn.Module, token_groups: torch.Tensor | None = None,
                       token_mask: torch.Tensor | None = None,
                       new_token_groups: torch.Tensor | int | None = None) -> Iterator[None]:
    """Routing inputs for the forwards of one `model.generate(...)` call inside the block (see the
    module doc for the rules): `token_groups` / `token_mask` (batch, prompt length) for the prompt,
    `new_token_groups` (an int, or (batch,) integers) the group of each row's generated tokens,
    required with `token_groups`. For decoder-only models called with `input_ids` or
    `inputs_embeds`. The hooks are removed and nothing is kept when the block ends."""
    prompt = _checked(token_groups, token_mask)
    if prompt is not None and prompt.token_groups is not None:
        if new_token_groups is None:
            raise ValueError("generation_routing needs new_token_groups (the group of each row's generated tokens) "
                             "when token_groups is given")
        rows = prompt.shape[0]
        new = torch.as_tensor(new_token_groups, device=prompt.token_groups.device)
        new = _checked(new.expand(rows).reshape(rows, 1), None).token_groups
    elif new_token_groups is not None:
        raise ValueError("new_token_groups without token_groups: the prompt's tokens would have no group")
    else:
        new = None
    routing = _GenerationRouting(prompt, new)
    handles = [model.register_forward_pre_hook(routing.enter, with_kwargs=True),
               model.register_forward_hook(routing.exit, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _GenerationRouting:
    """The hooks of `generation_routing`: each forward of the model runs inside a routing context
    built for its tokens, which ends with the forward."""

    def __init__(self, prompt: RoutingInputs | None, new_groups: torch.Tensor | None):
        self.prompt, self.new_groups = prompt, new_groups  # new_groups: (rows, 1)
        self.tokens: list = []  # ContextVar tokens of the forwards running (a stack)

    def enter(self, module, args, kwargs) -> None:
        inputs = self._inputs_for(module, args, kwargs)
        self.tokens.append(_CURRENT.set(inputs))

    def exit(self, module, args, output) -> None:
        if self.tokens:
            _CURRENT.reset(self.tokens.pop())

    def _inputs_for(self, module, args, kwargs) -> RoutingInputs | None:
        if self.prompt is None:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError(f"generation_routing: a forward of {type(module).__name__} got neither input_ids nor "
                             f"inputs_embeds")
        batch, length = tokens.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        rows, prompt_length = self.prompt.shape
        if batch % rows:
            raise ValueError(f"generation_routing was set for {rows} prompt rows but a forward got {batch} rows, "
                             f"not a whole number of copies of each")
        stop = start + length
        in_prompt, new = slice(min(start, prompt_length), min(stop, prompt_length)), stop - max(start, prompt_length)
        groups, mask = self.prompt.token_groups, self.prompt.token_mask
        if groups is not None:
            groups = _joined(groups[:, in_prompt], self.new_groups.expand(rows, max(new, 0)))
        if mask is not None:
            mask = _joined(mask[:, in_prompt], torch.ones(rows, max(new, 0), dtype=torch.bool, device=mask.device))
        if batch != rows:
            copies = batch // rows
            groups = None if groups is None else groups.repeat_interleave(copies, dim=0)
            mask = None if mask is None else mask.repeat_interleave(copies, dim=0)
        return RoutingInputs(groups, mask)


def _joined(prompt_part: torch.Tensor, new_part: torch.Tensor) -> torch.Tensor:
    if not new_part.shape[1]:
        return prompt_part
    return new_part if not prompt_part.shape[1] else torch.cat([prompt_part, new_part], dim=1)


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
