"""A candidate inference form of TeamLoRA in plain PyTorch ops, measured by `generate_speed.py
--candidate` against the one form the library runs (issue 12: an inference form stays only for a
stated gain). Not library code: it swaps the class of a model's TeamLoRA layers.

It is the former inference form without its compiled kernel and without its closed form: for one
generation (the bench's parameters never change) each layer keeps [A; R]^T and the (k x r) mix
(I + M) E, E sending expert i to its r_b columns, and per decode grid the logit bias g[group]
padded over z's columns. With q = softmax(logits + g) (I + M) E, |q|_1 = r_b |v|_1, so
    update = r_b k s * z * q / max(|q|_1, r_b eps)   (`reference`: / sum(q))
is the fused form's k s z * rep(v) / max(|v|_1, eps), with r_b k s as the last GEMM's alpha.
"""

from __future__ import annotations

import torch

from mm_teamlora.adapters.teamlora import L1_GUARD, TeamLoRALinear

KEPT_BIAS_MAX_TOKENS = 256  # bias rows kept for decode grids, not a prefill's


class CandidateTeamLoRALinear(TeamLoRALinear):
    def routed_forward(self, x: torch.Tensor, groups, mask, replay: bool) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or self.recorder is not None:
            return super().routed_forward(x, groups, mask, replay)
        plan = self.__dict__.get("_candidate_plan")
        if plan is None:
            plan = self.__dict__["_candidate_plan"] = _plan(self)
        result = self.base_layer(x)
        h = x.reshape(-1, self.in_features)
        bias = plan["biases"].get(h.shape[0]) if groups is not None else None
        if bias is None and groups is not None and self.group_bias is not None:
            bias = torch.nn.functional.pad(self.group_bias.detach()[groups], (self.config.r, 0))
            if h.shape[0] <= KEPT_BIAS_MAX_TOKENS:  # a decode step: every row's group is fixed
                plan["biases"][h.shape[0]] = bias
        z_logits = torch.mm(h, plan["down_t"]) if bias is None else torch.addmm(bias, h, plan["down_t"])
        z, logits = z_logits.split_with_sizes((self.config.r, self.num_experts), dim=-1)
        q = logits.softmax(-1) @ plan["mix"]
        update = z * q
        if self.config.competition_norm == "reference":
            update = update.div_(q.sum(-1, keepdim=True))
        else:
            update = update.div_(torch.linalg.vector_norm(q, 1, -1, keepdim=True).clamp_min_(self.expert_rank * L1_GUARD))
        return self._add_update(result, update.view(*x.shape[:-1], self.config.r), self.lora_B,
                                alpha=self.expert_rank * self.num_experts * self.scaling)


@torch.no_grad()
def _plan(layer: TeamLoRALinear) -> dict:
    k = layer.num_experts
    interaction = torch.eye(k, dtype=torch.float32, device=layer.lora_A.device)
    if layer.competition is not None:
        interaction = interaction + layer.competition.float()
    return {"down_t": torch.cat([layer.lora_A, layer.router]).t().contiguous(),
            "mix": interaction.repeat_interleave(layer.expert_rank, dim=1).contiguous(), "biases": {}}


def with_candidate(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its TeamLoRA layers running the candidate form in inference."""
    for module in model.modules():
        if type(module) is TeamLoRALinear:
            module.__class__ = CandidateTeamLoRALinear
    return model
