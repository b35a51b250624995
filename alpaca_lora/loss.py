"""Loss: the summed cross-entropy of a pass's target tokens, the LM head computed only where a target exists.

A loss function takes (model, batch) and returns the sum of the token losses over the batch's targets; the
training step divides by the global count of target tokens. `response_only_loss` is the default;
`padded_loss` is the standard computation (full logits everywhere) that it must equal and the benchmark
compares against.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .compiled import CompiledOrEager
from .data import IGNORE_INDEX

LOGIT_CHUNK = 256  # most positions per LM-head chunk: at most [256 x vocab] logits at once (on a CPU, faster than 1024)
CHUNK_ROWS_STEP = 16


def head_chunk_rows(count: int) -> int:
    """Rows per LM-head chunk for `count` target positions: equal chunks of at most LOGIT_CHUNK rows, rounded up
    to a multiple of 16; the last chunk is filled up with zero rows that carry no loss.

    The head's matmuls thus see one of 16 shapes however many targets a pass has. On a CPU every new
    matmul shape makes oneDNN build and cache a kernel with its own buffers (about 1.5 MB for this head), so
    shapes that followed the target count grew memory step after step; the fill costs under 16 rows a chunk.
    """
    chunks = max(1, math.ceil(count / LOGIT_CHUNK))
    return max(CHUNK_ROWS_STEP, math.ceil(count / chunks / CHUNK_ROWS_STEP) * CHUNK_ROWS_STEP)


def padded_loss(model, batch: dict) -> torch.Tensor:
    """The standard computation: full-vocabulary logits at every position, cross-entropy where targets exist."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # [rows, width, vocab] -> one row per position; fp32 for a stable log-softmax under bf16 autocast
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def response_only_loss(model, batch: dict) -> torch.Tensor:
    """The LM head and cross-entropy only where a target exists (the response, unless train_on_inputs).

    The decoder runs on every token (the prompt is context), but the [tokens x vocab] logits, the
    largest tensor of a step with a 32K vocabulary, are made only for target positions, a chunk at a
    time, and never kept for backward (see HeadCrossEntropy). Same loss and gradients as padded_loss.
    """
    causal_lm = model.get_base_model()  # peft wrapper -> e.g. LlamaForCausalLM
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                      position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    has_target = batch["targets"] != IGNORE_INDEX
    hidden, targets = hidden[has_target], batch["targets"][has_target]  # [targets, hidden], [targets]
    head = causal_lm.get_output_embeddings()  # also the input embeddings where they are tied (Gemma, small Qwen)
    # Gemma 2 caps its logits: cap * tanh(logits / cap), as the model's own forward does after its head
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if type(head) is torch.nn.Linear and not head.weight.requires_grad and head.bias is None:
        return HeadCrossEntropy.apply(hidden, head.weight, targets, cap)
    # a trainable or adapted head (e.g. LoRA on lm_head): the same chunks through autograd, recomputed in backward
    rows = head_chunk_rows(len(targets))
    fill = -len(targets) % rows  # zero rows with no target, so that every chunk has the same shape
    hidden, targets = F.pad(hidden, (0, 0, 0, fill)), F.pad(targets, (0, fill), value=IGNORE_INDEX)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), rows):
        chunk = slice(start, start + rows)
        total = total + checkpoint(
            lambda h, t: F.cross_entropy(soft_capped(head(h).float(), cap), t, ignore_index=IGNORE_INDEX,
                                         reduction="sum"),
            hidden[chunk], targets[chunk], use_reentrant=False)
    return total


def soft_capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float | None,
                          with_gradient: bool) -> torch.Tensor:
    """The summed loss of one chunk of [rows, vocab] logits; with_gradient: the logits are overwritten with
    d loss / d logits. Rows whose target is IGNORE_INDEX (the fill) add no loss. fp32 inside whatever the
    logits' dtype.

    Written for torch.compile, which fuses it into two passes over the logits (their row maxima and sums, then
    loss and gradient written in place): op by op it makes five [rows, vocab] fp32 tensors, and on a 2-core CPU
    with a 152K vocabulary that took longer than the head's two matmuls; in place, no second [rows, vocab]
    tensor exists at all.
    """
    z = logits.float()
    if cap is not None:  # capped = cap * tanh(logits / cap); its derivative is 1 - tanh^2
        capped_tanh = torch.tanh(z / cap)
        z = capped_tanh * cap
    log_probabilities = torch.log_softmax(z, dim=-1)
    has_target = targets != IGNORE_INDEX
    index = targets.clamp(min=0)[:, None]
    loss = -(log_probabilities.gather(1, index).squeeze(1) * has_target).sum()
    if with_gradient:
        # softmax - one_hot(target); a fill row's gradient is left as it is: it meets a zero hidden row and is dropped
        vocabulary = torch.arange(z.shape[1], device=z.device)
        probabilities = log_probabilities.exp()
        gradient = torch.where(vocabulary == index, probabilities - has_target[:, None].float(), probabilities)
        if cap is not None:
            gradient = gradient * (1 - capped_tanh.square())
        logits.copy_(gradient)
    return loss


# chunks of under a million logits (a small vocabulary's, such as a tiny test model's 16 x 512) run op by op
fused_softmax_cross_entropy = CompiledOrEager(softmax_cross_entropy, compile_from=2 ** 20)


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(soft_capped(hidden @ weight.T, cap), targets)) for a frozen head, chunk by chunk.

    Forward computes each chunk's logits, its loss, and at once its gradient with respect to `hidden`
    (softmax - one_hot) * d capped / d logits @ weight, then drops the logits: backward only scales the saved
    [targets, hidden] gradient. That is the forward matmul plus one gradient matmul per target, the minimum,
    and no [targets x vocab] tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap=None):
        # under autocast the matmuls run in the autocast dtype, like the nn.Linear they replace
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        weight_c = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=dtype)
        count, rows = len(targets), head_chunk_rows(len(targets))
        # one [rows x vocab] buffer for every chunk: on a CPU a fresh one (over glibc's 32 MB mmap ceiling) is
        # mapped anew each time, and faulting its pages in cost half as long again as the matmul that fills it
        logits = hidden.new_empty((rows, len(weight)), dtype=dtype)
        for start in range(0, count, rows):
            real = min(rows, count - start)  # the last chunk is filled up to `rows` with zero rows
            chunk_hidden = F.pad(hidden[start:start + real].to(dtype), (0, 0, 0, rows - real))
            chunk_targets = F.pad(targets[start:start + real], (0, rows - real), value=IGNORE_INDEX)
            torch.mm(chunk_hidden, weight_c.T, out=logits)
            # in training the logits become d loss / d logits; in evaluation the loss is all that is wanted
            total += fused_softmax_cross_entropy(logits, chunk_targets, cap, ctx.needs_input_grad[0])
            if ctx.needs_input_grad[0]:
                grad_hidden[start:start + real] = (logits @ weight_c)[:real]
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_total).to(ctx.hidden_dtype), None, None, None


class LossModule(torch.nn.Module):
    """model + loss as one module, so DDP wraps the whole forward (its gradient hooks need the forward to run
    through it, and response_only_loss calls the decoder and head itself)."""

    def __init__(self, model, loss_sum):
        super().__init__()
        self.model, self.loss_sum = model, loss_sum

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_sum(self.model, batch)
