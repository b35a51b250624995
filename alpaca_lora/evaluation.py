"""Evaluation: the mean loss per target token over held-out examples, split over the processes.

Training calls it every eval_steps on the validation split; `evaluate.py loss` calls it on any Alpaca file.
Each caller passes its own PassLayout: the loss is the same padded or packed (tests/test_packing.py).
"""

import torch

from .batching import PassLayout, collate, evaluation_passes
from .data import IGNORE_INDEX, Example


def evaluate_loss(loss_module, examples: list[Example], layout: PassLayout, pad_token_id: int, accelerator,
                  autocast) -> float:
    """sum(token losses) / target tokens over `examples`, every process taking every num_processes-th pass;
    dropout off while it runs, back on after."""
    loss_module.eval()
    all_passes = evaluation_passes([len(e.input_ids) for e in examples], layout)
    device = accelerator.device
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad(), autocast:
        for one_pass in all_passes[accelerator.process_index::accelerator.num_processes]:
            batch = {k: v.to(device) for k, v in collate(one_pass, examples, pad_token_id, layout).items()}
            total += loss_module(batch).float()
            count += (batch["targets"] != IGNORE_INDEX).sum()
    loss_module.train()
    return (accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum")).item()
