"""Attention on a CPU: in bf16 as batched matmuls with the probabilities recomputed in backward; otherwise, given a
mask, SDPA with grouped key/value heads uncopied.

bf16: PyTorch's CPU SDPA kernel (flash-style; a packed pass always has a mask, the block-diagonal one that keeps its
examples apart) ran a packed Qwen3-0.6B-shaped layer (4 rows of 256 tokens, 16 query and 8 key/value heads of 128)
at about 150 GFLOP/s, against 800 for a plain matmul on the same machine: 45-55 ms forward and backward.
`MatmulAttention` computes what transformers' eager attention does, op for op in the same dtypes (scores in bf16,
scaled, masked, softmax through fp32 back to bf16, times the values), in two matmuls forward and five backward (the
scores recomputed). The query heads of a group share one matmul against their key/value head (`[rows, kv heads,
group x queries, head_dim]`), so keys and values are never copied per query head and their gradients come out
summed over the group. Backward keeps q, k, v and the mask, not the output and log-sum-exp SDPA's kernel keeps (one
[tokens x heads x head_dim] tensor less a layer). With all keys for every query this took 30-40 ms for that layer,
and whole training steps on the bench's modern shapes, against SDPA's kernel in alternating runs, were 5-11% faster
on Qwen3-0.6B's, 6-20% on Gemma-3-270M's, within 3% either way on Llama-3.2-1B's (32 heads of 64: more softmax per
FLOP).

Queries now go 128 at a time, each block against only the keys some query of it sees (`_tiles`): causal attention
needs about half of a square's scores, and a packed row's later examples never look at its earlier ones. The
skipped probabilities are exactly 0, so the output is the same. The layer takes 23-24 ms against 30-35, and whole
steps in alternating runs: Qwen3 563 and 565 tokens/s against 523 and 512, Gemma 501 and 539 against 498 and 521,
Llama the same within noise.

The output is eager attention's to the bit (relative error against fp64 about 5e-3, where SDPA's kernel, which
keeps the scores in fp32, has 2-4e-3: both bf16's rounding, 2^-8). In fp32 SDPA's kernel is faster and is kept.

Otherwise, grouped heads: with a mask, transformers' SDPA path copies each key and value head once per query head
in its group (repeat_kv) before calling the kernel, as CUDA's fast kernels take no mask with grouped heads, and
autograd kept the copies (33 MB of a packed Qwen3-shaped pass's 355 MB). PyTorch's CPU kernel takes grouped heads
with a mask (enable_gqa), so they pass through uncopied; the numbers are the same.

Elsewhere (a GPU, dropout, a position bias or a softcap, a query that may see no key) it is transformers' own SDPA
attention unchanged.
"""

import torch
import torch.nn.functional as F

CPU_SDPA = "sdpa_cpu"  # the name the model's config carries; its masks are SDPA's
SCORES_PER_BLOCK = 2 ** 23  # the most scores (bf16: 16 MB) a block of queries makes at once
QUERY_TILE = 128  # most queries a block; 64 was no faster on 256-token rows, 256 slower on 512 and 1024
# a block's keys start and end at multiples of this: the matmuls then sum over the keys in the groups they would
# over all of them, and the output is the untiled one's to the bit (a span from key 70 changed the last bit)
KEY_ALIGN = 64


class MatmulAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) v for q [rows, heads, length, head_dim], k and v with heads / group heads,
    `blocked` True where a query may not see a key; recomputes the probabilities in backward.

    Queries go a block at a time against the keys the block sees (`_tiles`): the scores stay within
    SCORES_PER_BLOCK however long the rows, and blocked scores a whole block skips are never made (a packed pass of
    4 rows of 256 tokens: two blocks, the first against the first 128 keys).
    """

    @staticmethod
    def forward(ctx, query, key, value, blocked, scale):
        # the models hand key and value over as transposed views of [rows, length, heads, head_dim]; a block's
        # keys of that layout would be copied for every matmul, in forward and again in backward
        key, value = key.contiguous(), value.contiguous()
        by_group = _by_group(query, key)
        output = query.new_empty(by_group.shape)
        tiles = _tiles(query, blocked)
        for queries, keys in tiles:
            probabilities = _probabilities(_stacked(by_group, queries), key[:, :, keys], blocked[:, :, queries, keys],
                                           scale)
            output[:, :, :, queries] = torch.matmul(probabilities, value[:, :, keys]).view(
                output[:, :, :, queries].shape)
        ctx.save_for_backward(query, key, value, blocked)
        ctx.scale, ctx.tiles = scale, tiles
        return output.view(query.shape)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, blocked = ctx.saved_tensors
        by_group, grad_by_group = _by_group(query, key), _by_group(grad_output, key)
        grad_query = query.new_empty(by_group.shape)
        # summed over query blocks in fp32; over the group's query heads inside the matmuls
        grad_key, grad_value = torch.zeros_like(key, dtype=torch.float32), torch.zeros_like(value, dtype=torch.float32)
        for queries, keys in ctx.tiles:
            block_query, block_grad = _stacked(by_group, queries), _stacked(grad_by_group, queries)
            block_key, block_value = key[:, :, keys], value[:, :, keys]
            probabilities = _probabilities(block_query, block_key, blocked[:, :, queries, keys], ctx.scale)
            grad_value[:, :, keys] += torch.matmul(probabilities.transpose(-1, -2), block_grad)
            grad_probabilities = torch.matmul(block_grad, block_value.transpose(-1, -2))
            # softmax's backward, p * (dp - sum(dp * p)), as autograd's own softmax node computes it; then the scale
            grad_scores = torch._softmax_backward_data(grad_probabilities, probabilities, -1, probabilities.dtype)
            grad_scores.mul_(ctx.scale)
            grad_query[:, :, :, queries] = torch.matmul(grad_scores, block_key).view(
                grad_query[:, :, :, queries].shape)
            grad_key[:, :, keys] += torch.matmul(grad_scores.transpose(-1, -2), block_query)
        return grad_query.view(query.shape), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


def _by_group(tensor: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[rows, heads, length, d] -> [rows, kv_heads, group, length, d] (query head h uses key/value head
    h // group, as repeat_kv has it)."""
    rows, heads, length, head_dim = tensor.shape
    return tensor.reshape(rows, key.shape[1], heads // key.shape[1], length, head_dim)


def _tiles(query: torch.Tensor, blocked: torch.Tensor) -> list[tuple[slice, slice]]:
    """(queries, keys): query positions QUERY_TILE at a time (fewer where the scores of every row and head would
    pass SCORES_PER_BLOCK), each with the span of keys that some query of the block sees in some row.

    The keys outside the span (widened to multiples of KEY_ALIGN) are blocked for the whole block, so their
    scores need not be made: causal attention over 256 positions in tiles of 128 makes 3/4 of the scores, and a
    packed row's later examples do not look back at the earlier ones. A query's probabilities over the span are
    those over all keys (the rest are exp(-inf) = 0)."""
    rows, heads, length, _ = query.shape
    size = max(1, min(QUERY_TILE, SCORES_PER_BLOCK // (rows * heads * length)))
    seen = ~blocked[:, 0]  # [rows or 1, queries, keys]
    tiles = []
    for start in range(0, length, size):
        queries = slice(start, start + size)
        keys = seen[:, queries].any(1).any(0).nonzero()  # every query sees some key (_blocked)
        first, end = int(keys[0]) // KEY_ALIGN * KEY_ALIGN, -(-(int(keys[-1]) + 1) // KEY_ALIGN) * KEY_ALIGN
        tiles.append((queries, slice(first, min(end, length))))
    return tiles


def _stacked(by_group: torch.Tensor, queries: slice) -> torch.Tensor:
    """A block of queries of every head of a group, stacked: [rows, kv_heads, group x block, d], so that the
    group's heads take one matmul against their key/value head."""
    rows, kv_heads, _, _, head_dim = by_group.shape
    return by_group[:, :, :, queries].reshape(rows, kv_heads, -1, head_dim)


def _probabilities(stacked_query, key, blocked, scale) -> torch.Tensor:
    """softmax(q k^T * scale) with blocked scores at -inf: [rows, kv_heads, group x block, length], as eager
    attention computes it (the matmul's output in the inputs' dtype, softmax through fp32)."""
    rows, kv_heads, stacked, _ = stacked_query.shape
    block, length = blocked.shape[-2:]
    scores = torch.matmul(stacked_query, key.transpose(-1, -2)).mul_(scale)
    # blocked [rows or 1, 1, block, length]: one mask for every head of the group
    scores.view(rows, kv_heads, stacked // block, block, length).masked_fill_(blocked[:, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def _blocked(module, query, key, attention_mask, is_causal) -> torch.Tensor | None:
    """Where a query may not see a key, [rows, 1, length, length]; None where MatmulAttention does not apply.

    No mask: transformers leaves it out where it would be plain causal (every row one example, no padding);
    a pass of 256-token examples cut at cutoff_len is one. A query that may see no key at all (left padding)
    would get NaN from the softmax, where SDPA's kernel gives it zeros: SDPA runs those.
    """
    if attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if not causal or query.shape[2] != key.shape[2]:  # e.g. a cached key/value prefix
            return None
        length = query.shape[2]
        return torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)[None, None]
    if attention_mask.dtype != torch.bool or not attention_mask.any(-1).all():
        return None
    return attention_mask.logical_not()


def cpu_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' attention-function signature: query [batch, heads, length, head_dim], key and value with
    heads / num_key_value_groups heads; returns ([batch, length, heads, head_dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (query.device.type == "cpu" and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and not kwargs.get("output_attentions", False))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if plain and query.dtype == torch.bfloat16 and dropout == 0.0:
        blocked = _blocked(module, query, key, attention_mask, is_causal)
        if blocked is not None:
            return MatmulAttention.apply(query, key, value, blocked, scale).transpose(1, 2).contiguous(), None
    if plain and attention_mask is not None and getattr(module, "num_key_value_groups", 1) > 1:
        # a mask is given, so causality is in it (transformers also passes is_causal=False then)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                scale=scale, is_causal=False, enable_gqa=True)
        return output.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_cpu_sdpa(model) -> bool:
    """Switch a model on a CPU, on SDPA attention, to cpu_sdpa_attention; returns whether it was switched. Any other
    (a GPU, eager or flash-attention) is left as it is, so that the attention a training summary names is the one
    that ran."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa" or model.device.type != "cpu":
        return False
    # registered by name, as transformers registers attention kernels; the masks stay SDPA's
    AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention)
    AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)
    model.set_attn_implementation(CPU_SDPA)
    return model.config._attn_implementation == CPU_SDPA
