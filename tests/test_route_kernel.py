"""The compiled CPU update of TeamLoRA's inference form (mm_teamlora/adapters/kernels.py)."""

import os
import shutil
import warnings

import pytest
import torch

from mm_teamlora.adapters import kernels
from helpers import one_layer


def eager_route(z_logits: torch.Tensor, mix: torch.Tensor, mode: int, eps: float) -> torch.Tensor:
    """What the kernel promises, in PyTorch ops (float64 for a tight reference)."""
    k, r = mix.shape
    z, logits = z_logits.double().split([r, k], dim=-1)
    q = logits.softmax(-1) @ mix.double()
    total = torch.ones_like(q[:, :1])
    if mode == 1:
        total = q.abs().sum(-1, keepdim=True)
        total = total.clamp_min(eps) if eps >= 0 else total
    elif mode == 2:
        total = q.sum(-1, keepdim=True)
    return z * q / total


@pytest.fixture
def kernel():
    module = kernels.cpu_route_kernel()
    if module is None:
        pytest.skip("the kernel is not built here (no C++ compiler, or MM_TEAMLORA_CPU_KERNEL=0)")
    return module


def test_kernel_builds_where_a_compiler_exists():
    """Otherwise the kernel's tests skip and generation silently runs the slower ops."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None or os.environ.get("MM_TEAMLORA_CPU_KERNEL") == "0":
        pytest.skip("no C++ compiler here, or the kernel is turned off")
    assert kernels.cpu_route_kernel() is not None


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("tokens", [1, 7, 3000])  # 3000 rows: several threads' chunks
def test_kernel_equals_the_formula_on_strided_rows(kernel, mode, tokens):
    gen = torch.Generator().manual_seed(tokens + mode)
    r, k = 16, 4
    wide = torch.randn(tokens, r + k + 5, generator=gen) * 3  # a row stride above r + k, as a view has
    z_logits = wide[:, : r + k]
    mix = (torch.eye(k) + torch.randn(k, k, generator=gen) * 0.3).repeat_interleave(r // k, dim=1)
    out = kernel.route(z_logits, mix, mode, 1e-6)
    assert out.shape == (tokens, r) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), eager_route(z_logits, mix, mode, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["per token", "one row", "none"])
def test_add_update_is_result_plus_the_routed_update(kernel, bias):
    """A layer's whole update in one call: result + alpha * route(h [A; R]^T + bias) B^T."""
    gen = torch.Generator().manual_seed(3)
    tokens, d_in, d_out, r, k = 5, 12, 10, 8, 4
    result, h = torch.randn(tokens, d_out, generator=gen), torch.randn(tokens, d_in, generator=gen)
    down_t = torch.randn(r + k, d_in, generator=gen).t()  # a transposed view, as the plan keeps it
    lora_b = torch.randn(d_out, r, generator=gen)
    mix = (torch.eye(k) + 0.2).repeat_interleave(r // k, dim=1)
    shape = {"per token": (tokens, r + k), "one row": (r + k,), "none": None}[bias]
    bias = None if shape is None else torch.randn(shape, generator=gen)
    z_logits = h @ down_t if bias is None else h @ down_t + bias
    expected = result + 2.5 * kernel.route(z_logits, mix, 1, 1e-6) @ lora_b.t()
    out = kernel.add_update(result, h, down_t, bias, mix, lora_b, 1, 1e-6, 2.5)
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, result)


def test_kernel_applies_the_l1_guard_only_when_asked(kernel):
    """|q|_1 = 0.5 here (q = phi mix with mix = 0.5 everywhere): a guard of 2 binds, none does not."""
    z_logits = torch.cat([torch.ones(3, 8), torch.zeros(3, 2)], dim=1)
    mix = torch.full((2, 8), 0.5 / 8)
    torch.testing.assert_close(kernel.route(z_logits, mix, 1, 2.0), torch.full((3, 8), 0.5 / 8 / 2.0))
    torch.testing.assert_close(kernel.route(z_logits, mix, 1, -1.0), torch.full((3, 8), 1 / 8))


@pytest.mark.parametrize("bad", ["dtype", "columns", "mode"])
def test_kernel_rejects_inputs_it_cannot_read(kernel, bad):
    z_logits, mix, mode = torch.zeros(2, 10), torch.zeros(2, 8), 1
    if bad == "dtype":
        z_logits = z_logits.double()
    elif bad == "columns":
        z_logits = torch.zeros(2, 11)
    else:
        mode = 3
    with pytest.raises(RuntimeError, match="route: "):
        kernel.route(z_logits, mix, mode, -1.0)


def test_a_failed_build_warns_once_and_leaves_the_pytorch_ops(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built .*no C\\+\\+ compiler found"):
        assert kernels.cpu_route_kernel() is None
    model = one_layer(16, method="teamlora", r=8, num_experts=4)
    torch.nn.init.normal_(model[0].lora_B)
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once per process: no second warning
        assert kernels.cpu_route_kernel() is None
        expected = model(x).detach()  # grad on: the training form
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)  # the inference form, in PyTorch ops


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("MM_TEAMLORA_CPU_KERNEL", "0")
    assert kernels.cpu_route_kernel() is None
