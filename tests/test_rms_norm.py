"""LeanRMSNorm: each family's own RMSNorm output, its input gradient, and only the input and a number per row kept."""

import importlib

import pytest
import torch

from alpaca_lora.rms_norm import NORM_OFFSETS, compiled_rms_norm, compiled_rms_norm_backward, use_lean_rms_norm


def _norms(name: str, dim: int = 64, trained_weight: bool = False):
    """(transformers' norm, the same norm with the lean forward), weights random."""
    family = name.removesuffix("RMSNorm").lower()
    norm_class = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    stock, lean = norm_class(dim, eps=1e-6), norm_class(dim, eps=1e-6)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(0)))
    lean.load_state_dict(stock.state_dict())
    for norm in (stock, lean):
        norm.weight.requires_grad_(trained_weight)
    assert use_lean_rms_norm(torch.nn.Sequential(lean)) == 1
    return stock, lean


def _output_and_grad(norm, x, grad_y):
    x = x.clone().requires_grad_(True)
    y = norm(x)
    y.backward(grad_y)
    return y, x.grad


@pytest.mark.parametrize("name", NORM_OFFSETS)
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])  # the last: a k-bit base's norms
def test_the_lean_norm_is_the_familys_own_output_and_input_gradient(name, dtype, weight_dtype):
    stock, lean = _norms(name)
    stock.to(weight_dtype), lean.to(weight_dtype)
    generator = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(4, 7, 64, generator=generator)).to(dtype)
    grad_y = torch.randn(4, 7, 64, generator=generator).to(dtype)
    y, grad_x = _output_and_grad(lean, x, grad_y)
    stock_y, stock_grad_x = _output_and_grad(stock, x, grad_y)
    assert y.dtype == stock_y.dtype and grad_x.dtype == dtype and torch.equal(y, stock_y)  # the same ops, the same bits
    # backward is the closed form, not autograd's op-by-op chain: equal to rounding (one bf16 step in bf16)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_x, stock_grad_x, **tolerance)
    assert (grad_x.float() - stock_grad_x.float()).norm() / stock_grad_x.float().norm() < \
        (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("name", ["LlamaRMSNorm", "Gemma3RMSNorm"])
def test_the_compiled_kernels_give_the_same_numbers(name, monkeypatch):
    monkeypatch.setattr(compiled_rms_norm, "compile_from", 0)
    monkeypatch.setattr(compiled_rms_norm_backward, "compile_from", 0)
    stock, lean = _norms(name)
    generator = torch.Generator().manual_seed(2)
    x, grad_y = 3 * torch.randn(2, 9, 64, generator=generator), torch.randn(2, 9, 64, generator=generator)
    y, grad_x = _output_and_grad(lean, x, grad_y)
    stock_y, stock_grad_x = _output_and_grad(stock, x, grad_y)
    torch.testing.assert_close(y, stock_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, stock_grad_x, rtol=1e-5, atol=1e-6)
    assert compiled_rms_norm.compiled is not None and compiled_rms_norm_backward.compiled is not None  # no fallback


def _saved_bytes(norm, x) -> int:
    """Bytes autograd keeps for the norm's backward, not counting the input's and the weight's own storage."""
    shared = {x.untyped_storage().data_ptr(), norm.weight.untyped_storage().data_ptr()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in shared:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        norm(x)
    return sum(kept.values())


@pytest.mark.parametrize("name", ["Qwen3RMSNorm", "Gemma3RMSNorm"])
def test_backward_keeps_the_input_and_one_fp32_number_per_row(name):
    stock, lean = _norms(name)
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    assert _saved_bytes(lean, x) == 4 * 16 * 4  # rstd
    assert _saved_bytes(stock, x) >= 4 * 16 * 64 * 4  # the input's fp32 copy, at least


def test_a_trained_norm_weight_keeps_the_models_own_forward():
    stock, lean = _norms("LlamaRMSNorm", trained_weight=True)
    x, grad_y = torch.randn(3, 64), torch.randn(3, 64)
    y, grad_x = _output_and_grad(lean, x, grad_y)
    stock_y, stock_grad_x = _output_and_grad(stock, x, grad_y)
    assert torch.equal(y, stock_y) and torch.equal(grad_x, stock_grad_x)
    assert torch.equal(lean.weight.grad, stock.weight.grad)
