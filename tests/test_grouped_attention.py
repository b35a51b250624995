"""grouped_attention: a packed pass's grouped key/value heads reach SDPA uncopied, with the same logits and LoRA
gradients as transformers' SDPA path and exactly the copies' bytes fewer kept for backward."""

import numpy as np
import torch
from conftest import nudge_lora_b

from alpaca_lora.batching import packed_collate
from alpaca_lora.data import IGNORE_INDEX, Example
from alpaca_lora.grouped_attention import GROUPED_SDPA, use_grouped_sdpa
from alpaca_lora.loss import response_only_loss
from alpaca_lora.model import attach_lora, load_model

CPU = torch.device("cpu")


def _model(folder):
    torch.manual_seed(0)
    return nudge_lora_b(attach_lora(load_model(str(folder), None, False, CPU), r=4, alpha=8, dropout=0.0,
                                    target_modules=None, use_dora=False, use_rslora=False,
                                    gradient_checkpointing=False, quantization=None))


def _packed_batch():
    """Two rows of three examples each, end to end: SDPA gets the block-diagonal mask that keeps them apart."""
    generator = np.random.default_rng(2)
    examples = []
    for length in (9, 14, 6, 11, 7, 12):
        ids = generator.integers(10, 400, length, dtype=np.int32)
        # the second half's next tokens are targets, as a response's are
        targets = np.concatenate([np.full(length // 2, IGNORE_INDEX), ids[length // 2 + 1:], [IGNORE_INDEX]])
        examples.append(Example(input_ids=ids, targets=targets.astype(np.int32), truncated=False))
    return packed_collate([examples[:3], examples[3:]], pad_token_id=0)


def _loss_grads_and_saved_bytes(model, batch):
    """The summed loss, the LoRA gradients and the bytes of distinct tensors autograd keeps for backward."""
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = response_only_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved.values())


def test_grouped_heads_give_sdpas_loss_and_gradients_and_keep_no_copies(family_base):
    model = _model(family_base("qwen3"))  # 4 query heads, 2 key/value heads, head_dim 8, 2 layers
    config = model.get_base_model().config
    batch = _packed_batch()
    stock_loss, stock_grads, stock_bytes = _loss_grads_and_saved_bytes(model, batch)
    assert use_grouped_sdpa(model.get_base_model()) and config._attn_implementation == GROUPED_SDPA
    loss, grads, kept_bytes = _loss_grads_and_saved_bytes(model, batch)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-6, atol=0)
    for name in grads:
        assert (grads[name] - stock_grads[name]).norm() / stock_grads[name].norm() < 1e-5, name
    # the stock path keeps the key and value copied to every query head; this one keeps them as they are
    rows, length = batch["input_ids"].shape
    copies = (2 * rows * length * config.head_dim * (config.num_attention_heads - config.num_key_value_heads)
              * config.num_hidden_layers * 4)  # fp32
    assert stock_bytes - kept_bytes == copies


def test_only_a_cpu_model_on_sdpa_with_grouped_heads_is_switched(family_base, tiny_base):
    assert not use_grouped_sdpa(load_model(str(tiny_base), None, False, CPU))  # as many key/value heads as query heads
    eager = load_model(str(family_base("qwen3")), None, False, CPU, "eager")
    assert not use_grouped_sdpa(eager) and eager.config._attn_implementation == "eager"
    gemma2 = load_model(str(family_base("gemma2")), None, False, CPU)  # its capped attention logits need eager
    assert not use_grouped_sdpa(gemma2) and gemma2.config._attn_implementation == "eager"


def test_a_pass_without_a_mask_takes_transformers_own_path(family_base):
    """One example alone in its row needs no mask: transformers' SDPA path runs it (grouped heads, no copies)."""
    model = _model(family_base("qwen3")).get_base_model().eval()
    ids = torch.randint(10, 400, (1, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
        assert use_grouped_sdpa(model)
        grouped = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(grouped, stock, rtol=0, atol=0)
