"""RMSNorm that keeps only its input (in the model's dtype) and one fp32 number per row for backward.

transformers' RMSNorm computes in fp32 op by op, so autograd keeps an fp32 copy of every norm's input: with bf16
weights that is twice the input's size, for each of the 2 to 6 norms of every layer (Gemma 3 has four per layer
plus one on every query and key head). On the Gemma-3-270M shape the norms' fp32 copies were 270 MB of a packed
pass's 610 MB of activations. Here the input is kept as it came, with rstd = 1 / sqrt(mean(x^2) + eps) per row,
and backward recomputes x_hat = x * rstd; forward and backward each run as one compiled kernel where the tensor is
large enough for compiling to pay. The forward's ops are the model's own, so its output is the same.
"""

import types

import torch

from .compiled import CompiledOrEager

# the norms whose forward rms_norm reproduces, by class; the value is the weight's offset: Gemma scales by (1 + w)
# in fp32 and then casts, the others cast to the input's dtype and then scale by w
NORM_OFFSETS = {"LlamaRMSNorm": 0.0, "MistralRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "Qwen3RMSNorm": 0.0,
                "Phi3RMSNorm": 0.0, "Gemma2RMSNorm": 1.0, "Gemma3RMSNorm": 1.0}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the norm's output, rstd [..., 1] in fp32), computed as the model's own forward computes it."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x32 * rstd * (offset + weight.float())).to(x.dtype), rstd
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                      offset: float) -> torch.Tensor:
    """d loss / d x. With x_hat = x * rstd and g = d loss / d x_hat: rstd * (g - x_hat * mean(g * x_hat))."""
    x_hat = x.float() * rstd
    # g in the dtype autograd would use: the scale in fp32 for Gemma, in the output's dtype for the others
    g = grad_y.float() * (offset + weight.float()) if offset else (grad_y * weight).float()
    return (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)


compiled_rms_norm = CompiledOrEager(rms_norm, compile_from=2 ** 18)
compiled_rms_norm_backward = CompiledOrEager(rms_norm_backward, compile_from=2 ** 18)


class LeanRMSNorm(torch.autograd.Function):
    """rms_norm with a frozen weight, keeping x and rstd for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        y, rstd = compiled_rms_norm(x, weight, eps, offset)
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        return compiled_rms_norm_backward(grad_y.contiguous(), x, rstd, weight, ctx.offset), None, None, None


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:  # a trained norm weight (e.g. peft's modules_to_save): the model's own forward
        return type(self).forward(self, x)
    eps = self.eps if hasattr(self, "eps") else self.variance_epsilon
    return LeanRMSNorm.apply(x, self.weight, eps, NORM_OFFSETS[type(self).__name__])


def use_lean_rms_norm(model) -> int:
    """Give every RMSNorm of a known family LeanRMSNorm's forward; returns how many. Others are left as they are."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in NORM_OFFSETS:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
