"""The gated MLP's act(gate) * up, keeping only gate and up for backward.

Autograd keeps three [tokens x intermediate] tensors per layer for act(gate) * up: the activation's input (gate), its
output and up. The output is recomputed from gate in backward here, so a layer keeps two; with an intermediate size
3 to 4 times the hidden size that is the largest activation of a layer gone (72 MB of a packed pass on the
Gemma-3-270M shape). The ops are autograd's own (silu/gelu and their aten backward), so the numbers are the same;
forward and backward each run as one compiled kernel where the tensor is large enough for compiling to pay.
"""

import functools
import types

import torch
import torch.nn.functional as F

from .compiled import CompiledOrEager

SEPARATE_PROJECTIONS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma2MLP", "Gemma3MLP"}
FUSED_PROJECTIONS = {"Phi3MLP"}  # gate_up_proj, split in two


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def gated_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d gate, d loss / d up), as autograd computes them through act(gate) * up."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)
    return (torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh"),
            grad * F.gelu(gate, approximate="tanh"))


compiled_gated = CompiledOrEager(gated, compile_from=2 ** 18)
compiled_gated_backward = CompiledOrEager(gated_backward, compile_from=2 ** 18)


class LeanGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return compiled_gated(gate, up, activation)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return *compiled_gated_backward(grad.contiguous(), gate, up, ctx.activation), None


def activation_name(act) -> str | None:
    """The name LeanGated computes an activation module by: "silu" or "gelu_tanh" for the modules transformers makes
    of those names, None for any other."""
    if type(act).__name__ in ("SiLU", "SiLUActivation"):
        return "silu"
    tanh_gelu = getattr(act, "act", None)  # transformers' GELUTanh: functools.partial(F.gelu, approximate="tanh")
    if (type(act).__name__ == "GELUTanh" and isinstance(tanh_gelu, functools.partial) and tanh_gelu.func is F.gelu
            and tanh_gelu.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    return None


def _separate_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(LeanGated.apply(self.gate_proj(x), self.up_proj(x), self.lean_activation))


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(LeanGated.apply(gate, up, self.lean_activation))


def use_lean_gated_mlp(model) -> int:
    """Give every gated MLP of a known family with a known activation LeanGated's forward; returns how many."""
    count = 0
    for module in model.modules():
        kind = type(module).__name__
        activation = activation_name(getattr(module, "act_fn", getattr(module, "activation_fn", None)))
        if activation and kind in SEPARATE_PROJECTIONS | FUSED_PROJECTIONS:
            module.lean_activation = activation
            module.forward = types.MethodType(_separate_forward if kind in SEPARATE_PROJECTIONS else _fused_forward,
                                              module)
            count += 1
    return count
