"""cpu_attention: in bf16, MatmulAttention computes eager attention's output to the bit and gradients at bf16's
precision, in fp32 SDPA's to 1e-5 (with one query block or many); in fp32 a packed pass's grouped key/value heads
reach SDPA uncopied, with the same logits and LoRA gradients as transformers' SDPA path and exactly the copies'
bytes fewer kept for backward."""

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import nudge_lora_b

from alpaca_lora import cpu_attention
from alpaca_lora.batching import packed_collate
from alpaca_lora.cpu_attention import CPU_SDPA, MatmulAttention, cpu_sdpa_attention, use_cpu_sdpa
from alpaca_lora.data import IGNORE_INDEX, Example
from alpaca_lora.loss import response_only_loss
from alpaca_lora.model import attach_lora, load_model

CPU = torch.device("cpu")


def _model(folder, bf16=False):
    torch.manual_seed(0)
    return nudge_lora_b(attach_lora(load_model(str(folder), None, bf16, CPU), r=4, alpha=8, dropout=0.0,
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
    assert use_cpu_sdpa(model.get_base_model()) and config._attn_implementation == CPU_SDPA
    loss, grads, kept_bytes = _loss_grads_and_saved_bytes(model, batch)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-6, atol=0)
    for name in grads:
        assert (grads[name] - stock_grads[name]).norm() / stock_grads[name].norm() < 1e-5, name
    # the stock path keeps the key and value copied to every query head; this one keeps them as they are
    rows, length = batch["input_ids"].shape
    copies = (2 * rows * length * config.head_dim * (config.num_attention_heads - config.num_key_value_heads)
              * config.num_hidden_layers * 4)  # fp32
    assert stock_bytes - kept_bytes == copies


def test_only_a_cpu_model_on_sdpa_is_switched(family_base, tiny_base):
    assert use_cpu_sdpa(load_model(str(tiny_base), None, False, CPU))  # as many key/value heads as query heads
    eager = load_model(str(family_base("qwen3")), None, False, CPU, "eager")
    assert not use_cpu_sdpa(eager) and eager.config._attn_implementation == "eager"
    gemma2 = load_model(str(family_base("gemma2")), None, False, CPU)  # its capped attention logits need eager
    assert not use_cpu_sdpa(gemma2) and gemma2.config._attn_implementation == "eager"


def test_an_fp32_pass_without_a_mask_takes_transformers_own_path(family_base):
    """One example alone in its row needs no mask: in fp32 transformers' SDPA path runs it (grouped heads, no
    copies)."""
    model = _model(family_base("qwen3")).get_base_model().eval()
    ids = torch.randint(10, 400, (1, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
        assert use_cpu_sdpa(model)
        grouped = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(grouped, stock, rtol=0, atol=0)


def _attention_inputs(dtype, heads=4, kv_heads=2, head_dim=8):
    """Two packed rows of 24 tokens (examples of 10, 9, 5 and 14, 6, 4 tokens) with their block-diagonal causal
    mask; the query laid out as the models make it (a transposed view of [rows, length, heads, head_dim])."""
    generator = torch.Generator().manual_seed(0)
    example = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5, [0] * 14 + [1] * 6 + [2] * 4])
    mask = (example[:, None, :, None] == example[:, None, None, :]) & torch.ones(24, 24, dtype=torch.bool).tril()
    query = torch.randn(2, 24, heads, head_dim, generator=generator).to(dtype).transpose(1, 2).requires_grad_()
    key, value = (torch.randn(2, kv_heads, 24, head_dim, generator=generator).to(dtype).requires_grad_()
                  for _ in range(2))
    grad_output = torch.randn(2, heads, 24, head_dim, generator=generator).to(dtype)
    return query, key, value, mask, grad_output


def _output_and_grads(attention, query, key, value, grad_output):
    for tensor in (query, key, value):
        tensor.grad = None
    output = attention(query, key, value)
    output.backward(grad_output)
    return [output.detach()] + [tensor.grad for tensor in (query, key, value)]


@pytest.mark.parametrize("scores_per_block, query_tile, tiles", [
    (2 ** 23, 128, 1),  # one block against every key
    (2 ** 23, 8, 3),  # three blocks of 8 queries, each against the keys it sees (test_tiles_skip_blocked_keys)
    (100, 128, 24)])  # 24 blocks of one query
def test_matmul_attention_gives_sdpas_output_and_gradients_in_fp32(monkeypatch, scores_per_block, query_tile, tiles):
    monkeypatch.setattr(cpu_attention, "SCORES_PER_BLOCK", scores_per_block)
    monkeypatch.setattr(cpu_attention, "QUERY_TILE", query_tile)
    monkeypatch.setattr(cpu_attention, "KEY_ALIGN", 1)
    query, key, value, mask, grad_output = _attention_inputs(torch.float32)
    assert len(cpu_attention._tiles(query, ~mask)) == tiles
    ours = _output_and_grads(lambda q, k, v: MatmulAttention.apply(q, k, v, ~mask, 8 ** -0.5), query, key, value,
                             grad_output)
    sdpa = _output_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                             query, key, value, grad_output)
    for got, expected in zip(ours, sdpa):
        assert (got - expected).norm() / expected.norm() < 1e-5


def test_tiles_skip_blocked_keys(monkeypatch):
    """Row 0's examples are positions 0-9, 10-18 and 19-23, row 1's 0-13, 14-19 and 20-23: queries 16-23 see
    keys from 10 on (row 0's second example) and none before, causal blocks see no later keys."""
    monkeypatch.setattr(cpu_attention, "QUERY_TILE", 8)
    monkeypatch.setattr(cpu_attention, "KEY_ALIGN", 1)
    query, _, _, mask, _ = _attention_inputs(torch.bfloat16)
    assert cpu_attention._tiles(query, ~mask) == [(slice(0, 8), slice(0, 8)), (slice(8, 16), slice(0, 16)),
                                                  (slice(16, 24), slice(10, 24))]
    causal = torch.ones(24, 24, dtype=torch.bool).triu(1)[None, None]  # no mask: plain causal, broadcast over rows
    assert [keys for _, keys in cpu_attention._tiles(query, causal)] == [slice(0, 8), slice(0, 16), slice(0, 24)]
    monkeypatch.setattr(cpu_attention, "KEY_ALIGN", 4)  # spans widened to multiples of 4, within the row
    assert [keys for _, keys in cpu_attention._tiles(query, ~mask)] == [slice(0, 8), slice(0, 16), slice(8, 24)]


def test_tiled_bf16_attention_is_the_untiled_one(monkeypatch):
    """A packed pass of 4 rows of 256 tokens, their second examples starting at positions 70, 75, 90 and 130: one
    block of every query against every key, then blocks of 32 queries, their key spans aligned to 64. Keys a block skips add exactly zero, so the output and the query's
    gradient are the untiled ones to the bit; the key's and value's are summed over blocks in fp32 before rounding
    to bf16, so they agree to bf16's rounding."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(4, 256, heads, 16, generator=generator).to(torch.bfloat16).transpose(1, 2)
                         .requires_grad_() for heads in (4, 2, 2))
    grad_output = torch.randn(4, 4, 256, 16, generator=generator).to(torch.bfloat16)
    example = torch.zeros(4, 256, dtype=torch.long)
    for row, start in enumerate((70, 75, 90, 130)):
        example[row, start:] = 1
    blocked = ~((example[:, None, :, None] == example[:, None, None, :]) & torch.ones(256, 256).tril().bool())
    attention = lambda q, k, v: MatmulAttention.apply(q, k, v, blocked, 16 ** -0.5)  # noqa: E731
    monkeypatch.setattr(cpu_attention, "QUERY_TILE", 256)
    assert cpu_attention._tiles(query, blocked) == [(slice(0, 256), slice(0, 256))]
    whole = _output_and_grads(attention, query, key, value, grad_output)
    monkeypatch.setattr(cpu_attention, "QUERY_TILE", 32)
    assert [keys for _, keys in cpu_attention._tiles(query, blocked)][-1] == slice(64, 256)
    tiled = _output_and_grads(attention, query, key, value, grad_output)
    assert torch.equal(tiled[0], whole[0]) and torch.equal(tiled[1], whole[1])
    for got, expected in zip(tiled[2:], whole[2:]):
        assert 0 < (got.float() - expected.float()).norm() / expected.float().norm() < 4e-3


def test_matmul_attention_is_eager_attention_in_bf16():
    """The output equals transformers' eager attention to the bit; the gradients are within bf16's precision of
    fp64's (relative error under 1e-2; SDPA's kernel and eager's autograd reach 2-4e-3 on these inputs)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    query, key, value, mask, grad_output = _attention_inputs(torch.bfloat16)
    module = types.SimpleNamespace(num_key_value_groups=2, training=True)
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, torch.finfo(torch.bfloat16).min)
    eager, _ = eager_attention_forward(module, query, key, value, additive, scaling=8 ** -0.5, dropout=0.0)
    ours = _output_and_grads(lambda q, k, v: MatmulAttention.apply(q, k, v, ~mask, 8 ** -0.5), query, key, value,
                             grad_output)
    assert torch.equal(ours[0].transpose(1, 2), eager.detach())
    exact = _output_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        *(tensor.detach().double().requires_grad_() for tensor in (query, key, value)), grad_output.double())
    for got, expected in zip(ours, exact):
        assert 1e-4 < (got.double() - expected).norm() / expected.norm() < 1e-2  # bf16's rounding, and no worse


def test_what_matmul_attention_is_given_to_mask():
    module = types.SimpleNamespace(is_causal=True)
    query, key, _, mask, _ = _attention_inputs(torch.bfloat16)
    torch.testing.assert_close(cpu_attention._blocked(module, query, key, mask, None), ~mask)
    # no mask: transformers left it out because it is plain causal
    causal = cpu_attention._blocked(module, query, key, None, None)
    assert causal.shape == (1, 1, 24, 24) and torch.equal(causal[0, 0], torch.ones(24, 24, dtype=torch.bool).triu(1))
    assert cpu_attention._blocked(module, query, key, None, False) is None
    assert cpu_attention._blocked(module, query, key[:, :, :20], None, None) is None  # a cached prefix
    left_padded = mask.clone()
    left_padded[0, 0, 3] = False  # a query that sees no key: SDPA's kernel gives it zeros, a softmax NaN
    assert cpu_attention._blocked(module, query, key, left_padded, None) is None


def test_a_query_that_sees_nothing_gets_sdpas_zeros_not_nan():
    query, key, value, mask, _ = _attention_inputs(torch.bfloat16)
    mask[1, 0, :2] = False
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    with torch.no_grad():
        output, _ = cpu_sdpa_attention(module, query, key, value, mask, scaling=8 ** -0.5)
    assert not output.isnan().any() and output[1, :2].abs().sum() == 0


def test_a_bf16_packed_pass_runs_matmul_attention_with_eager_attentions_loss(family_base):
    """The forward is eager attention's to the bit, so is the loss; the LoRA gradients are as near eager
    attention's (whose softmax backward runs in fp32) and SDPA's as those two are to each other."""
    folder = family_base("qwen3")
    torch.manual_seed(0)  # the same LoRA initialisation as _model's
    eager = nudge_lora_b(attach_lora(load_model(str(folder), None, True, CPU, "eager"), r=4, alpha=8,
                                     dropout=0.0, target_modules=None, use_dora=False, use_rslora=False,
                                     gradient_checkpointing=False, quantization=None))
    model = _model(folder, bf16=True)
    batch = _packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_loss, eager_grads, _ = _loss_grads_and_saved_bytes(eager, batch)
        stock_loss, stock_grads, _ = _loss_grads_and_saved_bytes(model, batch)
        assert use_cpu_sdpa(model.get_base_model())
        calls = []
        original = MatmulAttention.apply
        MatmulAttention.apply = lambda *args: calls.append(1) or original(*args)
        try:
            loss, grads, _ = _loss_grads_and_saved_bytes(model, batch)
        finally:
            MatmulAttention.apply = original
    assert len(calls) == model.get_base_model().config.num_hidden_layers
    assert loss == eager_loss and loss != stock_loss
    for name in grads:
        # bf16's noise through two layers: SDPA's and eager's own gradients differ by 0.7-1.5% here
        noise = _relative(stock_grads[name], eager_grads[name])
        assert _relative(grads[name], eager_grads[name]) < 1.5 * noise, name
        assert _relative(grads[name], stock_grads[name]) < 1.5 * noise, name


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()
