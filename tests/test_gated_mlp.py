"""LeanGated: each family's own MLP output and input gradients, with gate and up alone kept for backward."""

import importlib

import pytest
import torch

from alpaca_lora.gated_mlp import (FUSED_PROJECTIONS, SEPARATE_PROJECTIONS, compiled_gated, compiled_gated_backward,
                                   use_lean_gated_mlp)

ACTIVATIONS = {"Gemma2MLP": "gelu_pytorch_tanh", "Gemma3MLP": "gelu_pytorch_tanh"}  # the others: silu


def _mlps(name: str, hidden_act: str | None = None):
    """(transformers' MLP of that class, a copy with the lean forward or None where it is not taken), random weights."""
    family = name.removesuffix("MLP").lower()
    config_class = getattr(importlib.import_module(f"transformers.models.{family}.configuration_{family}"),
                           f"{name.removesuffix('MLP')}{'Text' if family == 'gemma3' else ''}Config")
    act = hidden_act or ACTIVATIONS.get(name, "silu")
    config = config_class(hidden_size=32, intermediate_size=48, hidden_act=act, hidden_activation=act)
    mlp_class = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    torch.manual_seed(0)
    stock = mlp_class(config)
    lean = mlp_class(config)
    lean.load_state_dict(stock.state_dict())
    return stock, lean if use_lean_gated_mlp(torch.nn.Sequential(lean)) == 1 else None


def _output_and_grad(mlp, x, grad_y):
    x = x.clone().requires_grad_(True)
    y = mlp(x)
    y.backward(grad_y)
    return y, x.grad, {name: p.grad for name, p in mlp.named_parameters()}


@pytest.mark.parametrize("name", sorted(SEPARATE_PROJECTIONS | FUSED_PROJECTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_mlp_is_the_familys_own_output_and_gradients(name, dtype):
    stock, lean = _mlps(name)
    assert lean is not None  # the family's activation is one LeanGated knows
    stock.to(dtype), lean.to(dtype)
    generator = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(3, 5, 32, generator=generator).to(dtype), torch.randn(3, 5, 32, generator=generator).to(dtype)
    y, grad_x, grads = _output_and_grad(lean, x, grad_y)
    stock_y, stock_grad_x, stock_grads = _output_and_grad(stock, x, grad_y)
    # autograd's own ops in the same order: the same bits, gradients of the projections' weights included
    assert torch.equal(y, stock_y) and torch.equal(grad_x, stock_grad_x)
    assert grads.keys() == stock_grads.keys() and all(torch.equal(grads[n], stock_grads[n]) for n in grads)


@pytest.mark.parametrize("name", ["Qwen3MLP", "Gemma3MLP"])
def test_the_compiled_kernels_give_the_same_numbers(name, monkeypatch):
    monkeypatch.setattr(compiled_gated, "compile_from", 0)
    monkeypatch.setattr(compiled_gated_backward, "compile_from", 0)
    stock, lean = _mlps(name)
    generator = torch.Generator().manual_seed(2)
    x, grad_y = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 7, 32, generator=generator)
    y, grad_x, _ = _output_and_grad(lean, x, grad_y)
    stock_y, stock_grad_x, _ = _output_and_grad(stock, x, grad_y)
    torch.testing.assert_close(y, stock_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, stock_grad_x, rtol=1e-5, atol=1e-6)
    assert compiled_gated.compiled is not None and compiled_gated_backward.compiled is not None  # no fallback


def _kept_activations(mlp, x) -> int:
    """How many [.., intermediate]-wide tensors autograd keeps for backward."""
    kept = set()

    def pack(tensor):
        if tensor.dim() == 3 and tensor.shape[-1] == 48:
            kept.add(tensor.untyped_storage().data_ptr())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mlp(x)
    return len(kept)


@pytest.mark.parametrize("name", ["LlamaMLP", "Gemma3MLP"])
def test_backward_keeps_gate_and_up_not_the_activations_output(name):
    stock, lean = _mlps(name)
    x = torch.randn(2, 4, 32, requires_grad=True)
    assert _kept_activations(stock, x) == 3 and _kept_activations(lean, x) == 2  # gate, up (and act(gate))


def test_an_activation_it_does_not_know_keeps_the_models_own_mlp():
    stock, lean = _mlps("LlamaMLP", hidden_act="relu")
    assert lean is None
