"""LLaMA's weights in Meta's checkpoint layout, and the rotary re-layout that it shares with GGUF.

Hugging Face stores each head's q/k rows rotated in two halves; Meta's checkpoints and GGUF interleave them.
export.py writes Meta's layout through `meta_state_dict`; gguf_export.py re-lays LLaMA-architecture q and k with
`hf_to_meta_rotary` and names its tensors with the gguf package's map.
"""

import torch

META_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}


def hf_to_meta_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows rotated in two halves per head; Meta's and llama.cpp's layout interleaves them."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def meta_to_hf_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def interleaved_layout(model_config, state: dict, names: dict, embedding: str, norm: str, output: str,
                       layer_format: str) -> dict:
    """Merged HF weights under another format's names, q and k re-laid in the interleaved rotary order that
    Meta's checkpoints use. `names` maps HF's per-layer module names to the format's."""
    n_heads = model_config.num_attention_heads
    n_kv = getattr(model_config, "num_key_value_heads", None) or n_heads
    out = {embedding: state["model.embed_tokens.weight"], norm: state["model.norm.weight"],
           output: state.get("lm_head.weight", state["model.embed_tokens.weight"])}
    for layer in range(model_config.num_hidden_layers):
        for hf, name in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                weight = hf_to_meta_rotary(weight, n_heads)
            elif hf == "self_attn.k_proj":
                weight = hf_to_meta_rotary(weight, n_kv)
            out[layer_format.format(layer=layer, name=name)] = weight
    return out


def meta_state_dict(model_config, state: dict, dtype: torch.dtype) -> dict:
    """Merged HF weights renamed and re-laid for Meta's checkpoint format."""
    weights = interleaved_layout(model_config, state, META_NAMES, "tok_embeddings.weight", "norm.weight",
                                 "output.weight", "layers.{layer}.{name}.weight")
    return {k: v.to(dtype).contiguous() for k, v in weights.items()}
