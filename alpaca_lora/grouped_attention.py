"""SDPA attention that hands grouped key/value heads to the kernel as they are, also when a mask is given.

With grouped-query attention (fewer key/value heads than query heads: Llama 3, Mistral, Qwen, Gemma) and a mask,
transformers' SDPA path copies each key and value head once per query head in its group (repeat_kv) before
calling the kernel: CUDA's fast kernels take no mask together with grouped heads. A packed pass always has a mask
(the block-diagonal one that keeps its examples apart), so every layer made the copies and autograd kept them for
backward: on the Qwen3-0.6B shape (16 query, 8 key/value heads) 2 x 1024 extra numbers per token and layer, 33 MB
of a packed pass's 355 MB, and their backward summed the copies back. PyTorch's CPU kernels take grouped heads
with a mask (enable_gqa), so on a CPU this passes them through; the numbers are the same. Elsewhere (a GPU, no
mask, equal head counts, a position bias or a softcap) it is transformers' own SDPA attention unchanged.
"""

import torch
import torch.nn.functional as F

GROUPED_SDPA = "sdpa_grouped_kv"  # the name the model's config carries; its masks are SDPA's


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers' attention-function signature: query [batch, heads, length, head_dim], key and value with
    heads / num_key_value_groups heads; returns ([batch, length, heads, head_dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    passes_through = (attention_mask is not None and query.device.type == "cpu"
                      and getattr(module, "num_key_value_groups", 1) > 1
                      and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
                      and not kwargs.get("output_attentions", False))
    if not passes_through:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # a mask is given, so causality is in it (transformers also passes is_causal=False then)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                            scale=scaling, is_causal=False, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model) -> bool:
    """Switch a model on a CPU, on SDPA attention, with grouped key/value heads to grouped_sdpa_attention; returns
    whether it was switched. Any other (a GPU, eager or flash-attention, as many key/value heads as query heads) is
    left as it is, so that the attention a training summary names is the one that ran."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    grouped = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    if config._attn_implementation != "sdpa" or model.device.type != "cpu" or not grouped:
        return False
    # registered by name, as transformers registers attention kernels; the masks stay SDPA's
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)
    return model.config._attn_implementation == GROUPED_SDPA
