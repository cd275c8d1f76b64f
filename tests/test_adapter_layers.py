"""Exact equivalences the methods promise, on tiny Llama, Qwen2 and GPT-2 models."""

import contextlib
import copy

import pytest
import torch

from mm_teamlora.adapters import AdapterConfig, adapter_layers, apply_adapters, kernels, record_routing, routing_context
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


@pytest.mark.parametrize("competition_norm", ["l1", "reference"])
@pytest.mark.parametrize("competition", [True, False])
@pytest.mark.parametrize("group_routing", [True, False])
def test_teamlora_inference_forward_equals_the_training_forward(competition_norm, competition, group_routing, batch):
    """Eval without grad runs a separate few-op form (cached [k s A; R], folded interaction):
    same logits as the observed form, under no_grad and inference_mode, with and without groups."""
    ids, mask = batch
    groups = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(5))
    model = adapted(method="teamlora", competition_norm=competition_norm, competition=competition,
                    group_routing=group_routing).eval()
    randomize_adapters(model)
    outputs = []
    for context in (groups, None):
        with routing_context(context):
            observed = model(input_ids=ids, attention_mask=mask).logits.detach()  # grad on: training form
            with torch.no_grad():
                plain = model(input_ids=ids, attention_mask=mask).logits
            with torch.inference_mode():
                fast = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(plain, observed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast, observed, rtol=1e-5, atol=1e-5)
        outputs.append(fast)
    assert torch.allclose(*outputs) != group_routing  # the groups reached the inference form


@pytest.mark.parametrize("competition_norm", ["l1", "reference"])
@pytest.mark.parametrize("interaction", ["non-negative", "mixed signs", "a negative row sum"])
@pytest.mark.parametrize("path", ["cpu kernel", "float32 ops", "float64 ops"])
def test_teamlora_inference_forms_equal_the_training_forward_for_every_interaction(competition_norm, interaction,
                                                                                   path, batch):
    """The inference form folds the normaliser into the softmax where it is provably the sum
    (I + M >= 0 for l1; positive row sums for reference) and divides otherwise: every case gives
    the training form's logits, through the compiled CPU update, through PyTorch ops, and
    with the logit bias added outside the GEMM (float64), and each case takes the form it is
    meant to exercise."""
    if path == "cpu kernel" and kernels.cpu_route_kernel() is None:
        pytest.skip("no C++ compiler: the kernel is covered by tests/test_route_kernel.py's build check")
    ids, mask = batch
    dtype = torch.float64 if path == "float64 ops" else torch.float32
    model = adapted(method="teamlora", competition_norm=competition_norm, group_routing=True, dtype=dtype).eval()
    randomize_adapters(model)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            m = layer.competition
            if interaction == "non-negative":
                m.abs_()
            elif interaction == "mixed signs":
                m.copy_(torch.tensor([[0.0, 0.3, -0.2, 0.1], [-0.3, 0.0, 0.2, 0.1], [0.1, -0.1, 0.0, 0.2],
                                      [0.2, 0.1, -0.1, 0.0]], dtype=dtype))
            else:
                m[0] = torch.tensor([0.0, -0.9, -0.9, 0.4], dtype=dtype)  # row sum of I + M: -0.4
    closed = interaction == "non-negative" or (interaction, competition_norm) == ("mixed signs", "reference")
    expected_norm = None if closed else competition_norm
    groups = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(5))
    ops_only = kernels.pytorch_ops_only() if path == "float32 ops" else contextlib.nullcontext()
    with ops_only, routing_context(groups) as inputs:
        observed = model(input_ids=ids, attention_mask=mask).logits.detach()
        with torch.no_grad():
            fast = model(input_ids=ids, attention_mask=mask).logits
    plans = inputs.layer_state.values()
    assert {plan.norm for plan in plans} == {expected_norm}
    assert all((plan.kernel is not None) == (path == "cpu kernel") for plan in plans)
    torch.testing.assert_close(fast, observed, rtol=1e-5, atol=1e-5)


def test_teamlora_inference_forward_applies_the_l1_guard_like_the_training_forward(batch):
    """With I + M singular and near-uniform routing, |v|_1 falls below the guard for most tokens
    (weights well inside (-1, 1) instead of +-1): both forms clamp alike. float64 resolves v."""
    ids, mask = batch
    model = adapted(method="teamlora", num_experts=2, r=8, dtype=torch.float64).eval()
    randomize_adapters(model)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.competition.copy_(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]))  # v = (p1 - p2, p2 - p1)
            layer.router.mul_(1e-6)  # p1 - p2 of order 1e-7
    with record_routing(model) as record:
        observed = model(input_ids=ids, attention_mask=mask).logits.detach()
    mean_abs_weight = torch.stack([s.weight_sum.abs().sum() / s.tokens.sum() / 2 for s in record.layers.values()])
    assert mean_abs_weight.max() < 0.9  # unclamped, every |w_i| would be exactly 1
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, observed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interaction", ["mixed signs", "non-negative"])
def test_teamlora_inference_forward_in_bf16_is_as_accurate_as_the_training_forward(interaction, batch):
    """Both bf16 forms against the same weights in float32: the few-op form rounds in other places
    (a single chaotic position can differ more), but its mean error must stay of the training
    form's size; a wrong term would make it as large as the logits. Non-negative interactions
    take the closed form (log s joins the float32 logit bias)."""
    ids, mask = batch
    model = adapted(method="teamlora", group_routing=True, dtype=torch.bfloat16).eval()
    randomize_adapters(model, scale=0.1)
    if interaction == "non-negative":
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.competition.abs_()
    reference = copy.deepcopy(model).float()
    with routing_context(torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(5))) as inputs:
        exact = reference(input_ids=ids, attention_mask=mask).logits.detach()
        observed = model(input_ids=ids, attention_mask=mask).logits.detach()
        with torch.no_grad():
            fast = model(input_ids=ids, attention_mask=mask).logits
    assert {plan.norm for plan in inputs.layer_state.values()} == {None if interaction == "non-negative" else "l1"}
    assert fast.dtype == torch.bfloat16
    observed_error = (observed.float() - exact).abs().mean()
    assert (fast.float() - exact).abs().mean() <= 1.5 * observed_error < exact.abs().mean() / 10


def test_inference_caches_follow_every_parameter_and_the_routing_context(batch):
    """The cached matrices of the inference form are rebuilt after any in-place update (an
    optimizer step, a load) or a data assignment, and the group bias after a new context."""
    ids, mask = batch
    model = adapted(method="teamlora", group_routing=True).eval()
    randomize_adapters(model)
    layers = list(adapter_layers(model).values())
    groups = torch.zeros_like(ids)
    changes = [
        lambda layer: layer.lora_A.mul_(1.5),
        lambda layer: layer.lora_B.add_(0.1),
        lambda layer: layer.router.add_(0.1),
        lambda layer: layer.competition.mul_(-1.0),
        lambda layer: layer.group_bias.add_(torch.arange(layer.group_bias.numel()).view_as(layer.group_bias)),
        lambda layer: setattr(layer.lora_B, "data", layer.lora_B.data * 2),
    ]
    for change in changes:
        with routing_context(groups), torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
            for layer in layers:
                change(layer)
            cached = model(input_ids=ids, attention_mask=mask).logits
        with routing_context(groups):
            fresh = model(input_ids=ids, attention_mask=mask).logits.detach()
        assert not torch.allclose(before, cached)
        torch.testing.assert_close(cached, fresh)
    with torch.no_grad():
        with routing_context(groups):
            first = model(input_ids=ids, attention_mask=mask).logits
        with routing_context(groups + 1):  # same grid, other groups: a new bias
            second = model(input_ids=ids, attention_mask=mask).logits
    with routing_context(groups + 1):
        torch.testing.assert_close(second, model(input_ids=ids, attention_mask=mask).logits.detach())
    assert not torch.allclose(first, second)


def test_inference_matrices_are_not_kept_across_routing_contexts(batch):
    """DeepSpeed's all-gathers and `p.data.copy_` change parameters without bumping their version:
    a new routing context (a new generation) or no context must still see the new values."""
    ids, mask = batch
    model = adapted(method="teamlora", group_routing=True).eval()
    randomize_adapters(model)
    groups = torch.zeros_like(ids)
    for context in (groups, None):
        with routing_context(groups), torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
        for layer in adapter_layers(model).values():
            versions = [p._version for p in layer.parameters()]
            layer.lora_A.data.copy_(layer.lora_A.data * 1.5)
            layer.competition.data.copy_(-layer.competition.data)
            assert [p._version for p in layer.parameters()] == versions  # invisible to version checks
        with routing_context(context):
            expected = model(input_ids=ids, attention_mask=mask).logits.detach()  # training form
            with torch.no_grad():
                after = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_inference_forward_leaves_the_base_layer_output_untouched(batch):
    """A hook that keeps a base layer's output (activation capture) sees the frozen layer's value."""
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


def test_inference_form_in_float16_does_not_overflow_where_the_training_form_does_not():
    """The inference form's scale c = r_b k s rides on the last GEMM: an fp16 A x of 540 (above
    65504 / (k alpha) = 512) must not become inf."""
    model = one_layer(16, 8, torch.float16, method="teamlora", r=8, num_experts=4, alpha=32.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.fill_(0.0)
        layer.lora_A[:, 0] = 540.0
        layer.lora_B.fill_(1e-4)
    x = torch.zeros(2, 16, dtype=torch.float16)
    x[:, 0] = 1.0
    observed = model(x).detach()
    with torch.no_grad():
        fast = model(x)
    assert torch.isfinite(observed).all() and torch.isfinite(fast).all()
    torch.testing.assert_close(fast.float(), observed.float(), rtol=1e-2, atol=1e-2)


def test_group_bias_is_added_in_float32_in_the_bf16_inference_form():
    """Router maths runs in float32 in both forms: with large trained group biases (around 10)
    the bf16 inference form's update is as accurate as the training form's (adding g in bf16
    made its error about 1.6 times larger)."""
    torch.manual_seed(0)
    model = one_layer(64, dtype=torch.bfloat16, method="teamlora", r=8, num_experts=4, group_routing=True)
    layer = model[0]
    with torch.no_grad():
        for p in (layer.lora_B, layer.router, layer.competition):
            p.copy_(torch.randn_like(p) * 0.1)
        layer.group_bias.copy_(torch.randn_like(layer.group_bias) * 10)
    reference = copy.deepcopy(model).float()
    x = torch.randn(1, 64, 64)
    with routing_context(torch.randint(0, 3, (1, 64))):
        exact = reference(x).detach() - reference[0].base_layer(x).detach()
        observed = model(x.bfloat16()).detach().float() - reference[0].base_layer(x).detach()
        with torch.no_grad():
            fast = model(x.bfloat16()).float() - reference[0].base_layer(x)
    observed_error = (observed - exact).abs().mean()
    assert (fast - exact).abs().mean() <= 1.2 * observed_error


def test_a_long_prompt_leaves_no_per_layer_bias_in_the_context():
    """Decode steps keep their (tokens x (r + k)) logit bias; a 300-token prefill builds it per
    call (and still routes by group), so a long context does not hold one per layer."""
    model = one_layer(16, method="teamlora", r=8, num_experts=4, group_routing=True)
    with torch.no_grad():
        for p in (model[0].lora_B, model[0].group_bias):
            p.copy_(torch.randn_like(p))
    prompt, step = torch.randn(2, 300, 16), torch.randn(2, 1, 16)
    with routing_context(torch.randint(0, 3, (2, 300))) as inputs:
        expected = model(prompt).detach()  # grad on: the training form
        with torch.no_grad():
            prefill = model(prompt)
            model(step)
    assert list(inputs.layer_state[model[0]].biases) == [torch.Size([2, 1])]
    torch.testing.assert_close(prefill, expected)


def test_inference_form_runs_under_a_float64_default_dtype(batch):
    """`torch.set_default_dtype(torch.float64)` must not leak into a float32 model's matrices."""
    ids, mask = batch
    model = adapted(method="teamlora").eval()
    randomize_adapters(model)
    expected = model(input_ids=ids, attention_mask=mask).logits.detach()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            fast = model(input_ids=ids, attention_mask=mask).logits
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


def test_inference_matrices_live_in_the_routing_context_and_go_with_it(batch):
    import gc
    import weakref

    ids, mask = batch
    model = adapted(method="teamlora", group_routing=True).eval()
    with routing_context(torch.zeros_like(ids)) as inputs, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert set(inputs.layer_state) == set(adapter_layers(model).values())
        plan = weakref.ref(next(iter(inputs.layer_state.values())))
    del inputs
    gc.collect()
    assert plan() is None


def test_training_form_serves_parameters_without_version_or_storage(batch):
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
        model(input_ids=ids, attention_mask=mask)  # would leave a plan behind if one were kept
        swapped = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
    expected = functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
    torch.testing.assert_close(swapped, expected.detach())
