"""evaluation.py: the mean loss per target token, the same in any layout, with dropout off only while it runs."""

from contextlib import nullcontext

import pytest
import torch

from alpaca_lora.batching import PassLayout, pad_collate
from alpaca_lora.data import tokenize_rows
from alpaca_lora.evaluation import evaluate_loss
from alpaca_lora.loss import LossModule, padded_loss, response_only_loss
from alpaca_lora.model import attach_lora, load_model, load_tokenizer
from alpaca_lora.templates import load_template


def test_the_loss_is_the_mean_over_target_tokens_in_any_layout(tiny_base, alpaca_rows):
    from accelerate import Accelerator

    tokenizer = load_tokenizer(str(tiny_base))
    examples = tokenize_rows(alpaca_rows[:12], tokenizer, load_template("alpaca"), 512, False).examples
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_base), None, False, torch.device("cpu")), r=8, alpha=16, dropout=0.3,
                        target_modules=["q_proj", "v_proj"], use_dora=False, use_rslora=False,
                        gradient_checkpointing=False, quantization=None)
    loss_module = LossModule(model, response_only_loss).train()
    by_layout = {packing: evaluate_loss(loss_module, examples, PassLayout(3, 512, packing), tokenizer.pad_token_id,
                                        Accelerator(cpu=True), nullcontext()) for packing in (True, False)}
    assert all(module.training for module in loss_module.modules())  # dropout is back on for training
    model.eval()  # by hand: each example alone, the standard loss, summed, over the count of target tokens
    with torch.no_grad():
        total = sum(padded_loss(model, pad_collate([e], tokenizer.pad_token_id)).item() for e in examples)
    expected = total / sum(e.num_targets for e in examples)
    assert by_layout[True] == pytest.approx(expected, rel=1e-5) and by_layout[False] == pytest.approx(expected, rel=1e-5)
