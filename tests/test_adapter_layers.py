"""Exact equivalences the methods promise, on tiny Llama, Qwen2 and GPT-2 models."""

import pytest
import torch

from mm_teamlora.adapters import AdapterConfig, adapter_layers, apply_adapters, record_routing, routing_context
from conftest import tiny_model
from helpers import adapted, grads, one_layer, randomize_adapters

METHODS = ["lora", "moelora", "hydralora", "teamlora"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:balance loss not computed")  # training mode under no_grad is deliberate
def test_zero_init_B_leaves_outputs_bit_identical(family, method, dtype, batch):
    """Also in training mode with dropout on: B = 0 makes the update exactly zero."""
    ids, mask = batch
    model = tiny_model(family, dtype=dtype)
    model.train()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        apply_adapters(model, AdapterConfig(method=method, r=8, num_experts=4, dropout=0.05, group_routing=True))
        after = model(input_ids=ids, attention_mask=mask).logits
    assert after.dtype == dtype
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_uniform_weights_reduce_teamlora_to_rank_r_lora_with_scaling_alpha_over_r_b(family, batch):
    ids, mask = batch
    k, r, alpha = 4, 8, 16.0
    team = adapted(family, method="teamlora", r=r, num_experts=k, alpha=alpha)
    randomize_adapters(team)
    with torch.no_grad():
        for layer in adapter_layers(team).values():
            layer.router.zero_()  # phi = 1/k for every token ...
            layer.competition.zero_()  # ... and v = phi, so w_i = 1
    # a rank-r LoRA whose scaling alpha' / r equals TeamLoRA's alpha / (r / k)
    lora = adapted(family, method="lora", r=r, alpha=alpha * k)
    team_layers = adapter_layers(team)
    with torch.no_grad():
        for name, layer in adapter_layers(lora).items():
            layer.lora_A.copy_(team_layers[name].lora_A)
            layer.lora_B.copy_(team_layers[name].lora_B)
    assert lora.get_submodule(name).scaling == team_layers[name].scaling == alpha / (r / k)
    torch.testing.assert_close(team(input_ids=ids, attention_mask=mask).logits,
                               lora(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["teamlora", "moelora", "hydralora"])
@pytest.mark.parametrize("competition_norm", ["l1", "reference"])
def test_fused_equals_loop_in_values_and_gradients(method, competition_norm, batch):
    ids, mask = batch
    groups = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(3))
    results = {}
    for implementation in ("fused", "loop"):
        # float64, so that only a real difference in maths (not summation order) can fail this
        model = adapted("llama", dtype=torch.float64, method=method, num_experts=4, group_routing=True,
                        competition_norm=competition_norm, implementation=implementation)
        randomize_adapters(model, seed=11)
        with routing_context(groups, mask.bool()):
            logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float().square().mean()).backward()
        results[implementation] = (logits.detach(), grads(model))
    (fused_out, fused_grads), (loop_out, loop_grads) = results["fused"], results["loop"]
    torch.testing.assert_close(fused_out, loop_out, rtol=1e-10, atol=1e-12)
    assert fused_grads.keys() == loop_grads.keys() and len(fused_grads) > 0
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], loop_grads[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_teamlora_matches_the_formula_token_by_token():
    """y = W0 x + b + sum_i w_i B_i dropout(s * A_i x), w = k v / sum v, v = phi (I + M)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    config = AdapterConfig(method="teamlora", r=6, num_experts=3, alpha=4.0, dropout=0.0,
                           competition_norm="reference", target_modules=["layer"])
    model = apply_adapters(torch.nn.ModuleDict({"layer": base}), config)
    layer = model["layer"]
    randomize_adapters(model, seed=5)
    x = torch.randn(5, 12)
    y = layer(x)
    k, rb, s = 3, 2, 4.0 / 2
    for t in range(5):
        phi = torch.softmax(layer.router @ x[t], -1)
        v = phi @ (torch.eye(k) + layer.competition)
        w = k * v / v.sum()
        z = s * (layer.lora_A @ x[t])
        expected = base(x[t]) + sum(w[i] * layer.lora_B[:, i * rb:(i + 1) * rb] @ z[i * rb:(i + 1) * rb] for i in range(k))
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-6)


def test_l1_norm_equals_reference_when_interactions_are_non_negative_and_bounds_weights_otherwise():
    layer_ref = adapted(method="teamlora", competition_norm="reference")
    layer_l1 = adapted(method="teamlora", competition_norm="l1")
    team_ref = next(iter(adapter_layers(layer_ref).values()))
    team_l1 = next(iter(adapter_layers(layer_l1).values()))
    probs = torch.softmax(torch.randn(64, 4), -1)
    with torch.no_grad():
        team_ref.competition.uniform_(0.0, 0.1)
        team_l1.competition.copy_(team_ref.competition)
        torch.testing.assert_close(team_ref.expert_weights(probs), team_l1.expert_weights(probs))
        torch.testing.assert_close(team_l1.expert_weights(probs).sum(-1), torch.full((64,), 4.0))
        # an interaction matrix that drives sum(v) to ~0 blows the reference up; l1 stays bounded
        # (I + M) maps phi to v = (phi0 - phi1, phi1 - phi0, 1e-3 phi2, 0): sum(v) is ~0
        interaction = torch.zeros(4, 4)
        interaction[:2, :2] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        interaction[2, 2] = 1e-3
        team_ref.competition.copy_(interaction - torch.eye(4))
        team_l1.competition.copy_(team_ref.competition)
        assert team_ref.expert_weights(probs).abs().max() > 100
        assert team_l1.expert_weights(probs).abs().max() <= 4 + 1e-5


def test_competition_off_gives_k_times_router_probabilities():
    model = adapted(method="teamlora", competition=False)
    layer = next(iter(adapter_layers(model).values()))
    assert layer.competition is None
    probs = torch.softmax(torch.randn(8, 4), -1)
    torch.testing.assert_close(layer.expert_weights(probs), 4 * probs)


def test_competition_matrix_starts_in_range_with_zero_diagonal():
    model = adapted(method="teamlora", num_experts=8, r=16)
    for layer in adapter_layers(model).values():
        m = layer.competition
        assert torch.all(m.diagonal() == 0) and m.abs().max() <= 0.1 and m.abs().max() > 0


def test_moelora_is_k_independent_rank_r_over_k_loras_mixed_by_softmax(batch):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    model = apply_adapters(torch.nn.ModuleDict({"layer": base}),
                           AdapterConfig(method="moelora", r=8, num_experts=4, alpha=16.0, dropout=0.0, target_modules=["layer"]))
    layer = model["layer"]
    randomize_adapters(model)
    x = torch.randn(3, 16)
    phi = torch.softmax(x @ layer.router.T, -1)
    expected = base(x) + sum(
        phi[:, i:i + 1] * (16.0 / 8) * (x @ layer.lora_A[2 * i:2 * i + 2].T @ layer.lora_B[:, 2 * i:2 * i + 2].T)
        for i in range(4))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_and_modules_to_save_get_gradients(method, batch):
    ids, mask = batch
    model = adapted(method=method, modules_to_save=["norm"], dropout=0.05, group_routing=method != "lora")
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    adapter_keys = ("lora_A", "lora_B", "router", "competition", "group_bias")
    for name, p in model.named_parameters():
        trainable = name.split(".")[-1] in adapter_keys or name.startswith("model.norm.")
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name
    assert all(p.grad is not None for n, p in model.named_parameters()
               if n.endswith(("lora_A", "lora_B")) or n.startswith("model.norm."))


def test_adapter_layers_take_the_mode_of_the_layer_they_replace():
    model = tiny_model("llama").eval()
    apply_adapters(model, AdapterConfig(method="teamlora", dropout=0.5))
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_bf16_training_step_runs_and_keeps_dtypes(method, batch):
    ids, mask = batch
    model = adapted(method=method, dtype=torch.bfloat16, dropout=0.05)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for layer in adapter_layers(model).values():
        assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_A.grad is not None


@pytest.mark.parametrize("interaction", ["non-negative", "mixed signs", "a negative row sum"])
@pytest.mark.parametrize("competition_norm", ["l1", "reference"])
def test_fused_equals_loop_for_every_kind_of_interaction_in_eval_without_grad(competition_norm, interaction, batch):
    """Generation runs the fused form under no_grad / inference_mode: it equals the loop form
    whatever the signs of I + M (where the two normalisations agree and where they do not)."""
    ids, mask = batch
    groups = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(5))
    outputs = {}
    for implementation in ("fused", "loop"):
        model = adapted(method="teamlora", competition_norm=competition_norm, group_routing=True,
                        implementation=implementation, dtype=torch.float64).eval()
        randomize_adapters(model)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                m = layer.competition
                if interaction == "non-negative":
                    m.abs_()
                elif interaction == "mixed signs":
                    m.copy_(torch.tensor([[0.0, 0.3, -0.2, 0.1], [-0.3, 0.0, 0.2, 0.1], [0.1, -0.1, 0.0, 0.2],
                                          [0.2, 0.1, -0.1, 0.0]], dtype=torch.float64))
                else:
                    m[0] = torch.tensor([0.0, -0.9, -0.9, 0.4], dtype=torch.float64)  # row sum of I + M: -0.4
        with routing_context(groups), torch.inference_mode():
            outputs[implementation] = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(outputs["fused"], outputs["loop"], rtol=1e-10, atol=1e-12)


def test_l1_guard_binds_alike_in_fused_and_loop_forms(batch):
    """With I + M singular and near-uniform routing, |v|_1 falls below the guard for most tokens
    (weights well inside (-1, 1) instead of +-1): both forms clamp alike. float64 resolves v."""
    ids, mask = batch
    outputs = {}
    for implementation in ("fused", "loop"):
        model = adapted(method="teamlora", num_experts=2, r=8, dtype=torch.float64, implementation=implementation).eval()
        randomize_adapters(model)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.competition.copy_(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]))  # v = (p1 - p2, p2 - p1)
                layer.router.mul_(1e-6)  # p1 - p2 of order 1e-7
        with torch.no_grad(), record_routing(model) as record:
            outputs[implementation] = model(input_ids=ids, attention_mask=mask).logits
        mean_abs_weight = torch.stack([s.weight_sum.abs().sum() / s.tokens.sum() / 2 for s in record.layers.values()])
        assert mean_abs_weight.max() < 0.9  # unclamped, every |w_i| would be exactly 1
    torch.testing.assert_close(outputs["fused"], outputs["loop"], rtol=1e-10, atol=1e-12)


def test_forward_leaves_the_base_layer_output_untouched(batch):
    """A hook that keeps a base layer's output (activation capture) sees the frozen layer's value:
    the update is added out of place."""
    ids, mask = batch
    model = adapted(method="teamlora").eval()
    randomize_adapters(model)
    layer = next(iter(adapter_layers(model).values()))
    kept = []
    layer.base_layer.register_forward_hook(lambda module, args, out: kept.append((out, out.clone())))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    out, copy_at_hook = kept[0]
    assert torch.equal(out, copy_at_hook)


@pytest.mark.parametrize("implementation", ["fused", "loop"])
def test_float16_forward_does_not_overflow_where_the_maths_does_not(implementation):
    """The fused form's factor k s rides on the last GEMM: an fp16 A x of 540 (above
    65504 / (k alpha) = 512) must not become inf in either form."""
    model = one_layer(16, 8, torch.float16, method="teamlora", r=8, num_experts=4, alpha=32.0,
                      implementation=implementation)
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.fill_(0.0)
        layer.lora_A[:, 0] = 540.0
        layer.lora_B.fill_(1e-4)
    x = torch.zeros(2, 16, dtype=torch.float16)
    x[:, 0] = 1.0
    with torch.no_grad():
        out = model(x)
        exact = model.float()(x.float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)


def test_teamlora_serves_parameters_without_version_or_storage(batch):
    """Adapters created under inference_mode have no version counter; torch.func.functional_call
    swaps in other tensors: both still get the right outputs."""
    from torch.func import functional_call

    ids, mask = batch
    with torch.inference_mode():
        model = adapted(method="teamlora").eval()
        randomize_adapters(model)
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    model = adapted(method="teamlora").eval()
    randomize_adapters(model)
    params = {n: p.detach() * 1.5 if "lora_A" in n else p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        swapped = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
    expected = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
    torch.testing.assert_close(swapped, expected.detach())
