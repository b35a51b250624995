"""Batching: which examples each forward pass takes, and the tensors they become.

alpaca-lora's one flag, --micro_batch_size, has meant three things; here each has its own name:

- a *group*: `examples_per_group` (= micro_batch_size) examples, the unit the plan deals out. One optimizer
  step takes `groups_per_step` = accumulation x world_size groups of the epoch's seeded order, and each
  process takes `accumulation` of them: the global batch is batch_size examples however it is split.
- a *row*: one sequence of the batch tensor. Padded: one example, right-padded. Packed: whole examples laid
  end to end, up to `row_length` (cutoff_len) tokens, `position_ids` restarting at each example.
- a *pass*: one forward and backward on `rows_per_pass` (= micro_batch_size) rows. Padded, a pass is one
  group. Packed, a process's groups for the step are first laid into rows, so a step makes as many passes
  as its rows need, fewer than its groups. With a variable-length attention kernel (flash-attention), the
  rows of a pass go end to end in one row: the kernel's cost is per example whatever the row.

A pass is a list of rows, a row a list of example indices; `collate` makes the tensors.
"""

import math
import random
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Example


@dataclass(frozen=True)
class StepPlan:
    """Which examples each process trains on at each optimizer step; the same plan on every process."""

    lengths: list[int]  # tokens of every training example
    examples_per_group: int
    accumulation: int  # groups per process per step
    world_size: int
    seed: int
    group_by_length: bool

    @property
    def groups_per_step(self) -> int:
        return self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Whole steps only: an incomplete last step of an epoch is dropped."""
        return math.ceil(len(self.lengths) / self.examples_per_group) // self.groups_per_step

    def groups(self, step: int, rank: int) -> list[list[int]]:
        """Process `rank`'s `accumulation` groups of example indices for optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        plan = plan_groups(self.lengths, self.examples_per_group, self.seed, epoch, self.group_by_length,
                           self.groups_per_step)
        step_groups = plan[index * self.groups_per_step:(index + 1) * self.groups_per_step]
        return step_groups[rank * self.accumulation:(rank + 1) * self.accumulation]


def plan_groups(lengths: list[int], examples_per_group: int, seed: int, epoch: int,
                group_by_length: bool, groups_per_step: int) -> list[list[int]]:
    """One epoch's groups as lists of example indices.

    The order is a seeded shuffle per epoch. With group_by_length, the shuffled order is cut into
    stretches of 50 steps and each stretch is sorted by length, so a group holds examples of similar
    length and little padding, while the order of the stretches stays random.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if group_by_length:
        stretch = examples_per_group * groups_per_step * 50
        order = [i for start in range(0, len(order), stretch)
                 for i in sorted(order[start:start + stretch], key=lambda i: -lengths[i])]
    return [order[start:start + examples_per_group] for start in range(0, len(order), examples_per_group)]


@dataclass(frozen=True)
class PassLayout:
    """How groups become passes of rows."""

    rows_per_pass: int  # --micro_batch_size
    row_length: int  # --cutoff_len: the most tokens a packed row holds
    packing: bool
    one_row: bool = False  # a variable-length attention kernel: each pass's rows end to end in one row


def passes(groups: list[list[int]], lengths: list[int], layout: PassLayout) -> list[list[list[int]]]:
    """Padded: each group is a pass, one example per row. Packed: the groups' examples laid into as few rows
    of row_length tokens as first-fit decreasing finds, rows_per_pass rows a pass (one row with one_row)."""
    if not layout.packing:
        return [[[i] for i in group] for group in groups]
    rows = pack_rows([i for group in groups for i in group], lengths, layout.row_length)
    packed = [rows[start:start + layout.rows_per_pass] for start in range(0, len(rows), layout.rows_per_pass)]
    if layout.one_row:
        return [[[i for row in group for i in row]] for group in packed]
    return packed


def evaluation_passes(lengths: list[int], layout: PassLayout) -> list[list[list[int]]]:
    """Every example once, in passes of examples of similar length (less padding); no shuffle."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = [order[i:i + layout.rows_per_pass] for i in range(0, len(order), layout.rows_per_pass)]
    return passes(groups, lengths, layout)


def collate(one_pass: list[list[int]], examples: list[Example], pad_token_id: int, layout: PassLayout) -> dict:
    """The tensors of one pass: packed rows, or one padded row per example."""
    if layout.packing:
        return packed_collate([[examples[i] for i in row] for row in one_pass], pad_token_id)
    return pad_collate([examples[i] for [i] in one_pass], pad_token_id)


def pad_collate(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int = 8) -> dict:
    """Right-pad each example to the longest (rounded up, as alpaca-lora does), with an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.from_numpy(example.input_ids)
        targets[row, :n] = torch.from_numpy(example.targets)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def pack_rows(indices: list[int], lengths: list[int], row_length: int) -> list[list[int]]:
    """Lay examples end to end in rows of at most `row_length` tokens, as few rows as first-fit decreasing finds.

    Rows stay as long as one padded example at most (cutoff_len), so attention costs no more than it
    does padded: packing everything into one long row would make it quadratic in the whole pass.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        fitting = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fitting is None:
            rows.append([i])
            room.append(row_length - lengths[i])
        else:
            rows[fitting].append(i)
            room[fitting] -= lengths[i]
    return rows


def packed_collate(rows: list[list[Example]], pad_token_id: int, pad_to_multiple_of: int = 64) -> dict:
    """[rows, width]: each row its examples end to end, `position_ids` restarting at 0 for each.

    The width is rounded up to a multiple of 64, not 8: on a CPU, every new shape of a pass makes the matmul and
    attention kernels compile code for it, which their caches keep for the rest of the process, so few shapes keep
    memory from creeping up with the steps (Qwen3-0.6B shape, 30 steps of Alpaca rows, cutoff 256: peak 1,111 MB
    above the libraries against 1,251, for 7.6% of the tokens padding instead of 6.4%).

    There is no attention mask on purpose: given restarting position_ids and no mask, transformers builds
    a block-diagonal causal mask (each token sees only its own example); with a 2D mask it would not.
    A row shorter than the widest is filled with pad tokens that form a segment of their own (positions
    restarting, no targets), so no real token attends to them. Targets were shifted per example, so none
    points across a boundary.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, start:start + n] = torch.from_numpy(example.input_ids)
            targets[r, start:start + n] = torch.from_numpy(example.targets)
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the filler: a segment of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}
