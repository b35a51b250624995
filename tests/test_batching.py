"""batching.py: groups of examples per step and process, passes of rows, and the tensors they become."""

import torch

from alpaca_lora.batching import (PassLayout, StepPlan, collate, evaluation_passes, pack_rows, pad_collate, passes,
                                  plan_groups)
from alpaca_lora.data import IGNORE_INDEX, tokenize_rows
from alpaca_lora.model import load_tokenizer
from alpaca_lora.templates import load_template

LENGTHS = [120, 30, 250, 75, 60, 200, 10, 90, 256, 5, 44, 180, 33, 17, 140, 66, 8, 230, 51, 99, 12, 160]  # 22


def test_the_plan_covers_every_example_once_per_epoch():
    lengths = [5, 60, 7, 33, 12, 90, 2, 41, 18, 75, 3]
    plan = plan_groups(lengths, 3, seed=0, epoch=0, group_by_length=False, groups_per_step=1)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    assert plan == plan_groups(lengths, 3, seed=0, epoch=0, group_by_length=False, groups_per_step=1)
    assert plan != plan_groups(lengths, 3, seed=0, epoch=1, group_by_length=False, groups_per_step=1)
    grouped = plan_groups(lengths, 3, seed=0, epoch=0, group_by_length=True, groups_per_step=1)
    assert sorted(i for mb in grouped for i in mb) == list(range(len(lengths)))

    def padded_tokens(p):
        return sum(len(mb) * max(lengths[i] for i in mb) for mb in p)
    assert padded_tokens(grouped) < padded_tokens(plan)


def test_pad_collate_pads_right_to_a_multiple_of_8(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    rows = [{"instruction": "Hi.", "input": "", "output": "Hello."},
            {"instruction": "Count to three.", "input": "", "output": "One, two, three."}]
    examples = tokenize_rows(rows, tokenizer, load_template("alpaca_short"), 256, False).examples
    batch = pad_collate(examples, tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (2, -(-width // 8) * 8)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids.tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert set(batch["input_ids"][row, n:].tolist()) <= {tokenizer.pad_token_id}
        assert set(batch["targets"][row, n:].tolist()) <= {IGNORE_INDEX}


def test_pack_rows_keeps_to_the_row_length_and_places_every_example_once():
    lengths = [120, 30, 250, 75, 60, 200, 10, 90, 256, 5]
    bins = pack_rows(list(range(10)), lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(10))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) == 5  # 1096 tokens: 5 bins of 256 is the least possible


def test_each_step_deals_its_groups_out_to_the_processes_and_an_epoch_covers_whole_steps():
    plan = StepPlan(lengths=LENGTHS, examples_per_group=2, accumulation=2, world_size=2, seed=3, group_by_length=False)
    assert (plan.groups_per_step, plan.steps_per_epoch) == (4, 2)  # 11 groups: 2 whole steps, the 3 left are dropped
    epoch_0 = plan_groups(LENGTHS, 2, seed=3, epoch=0, group_by_length=False, groups_per_step=4)
    assert [plan.groups(0, 0), plan.groups(0, 1), plan.groups(1, 0), plan.groups(1, 1)] == \
        [epoch_0[0:2], epoch_0[2:4], epoch_0[4:6], epoch_0[6:8]]
    assert plan.groups(2, 0) == plan_groups(LENGTHS, 2, seed=3, epoch=1, group_by_length=False, groups_per_step=4)[0:2]
    seen = [i for step in range(2) for rank in range(2) for group in plan.groups(step, rank) for i in group]
    assert len(seen) == len(set(seen)) == 16  # no example twice in an epoch
    one_process = StepPlan(LENGTHS, examples_per_group=2, accumulation=4, world_size=1, seed=3, group_by_length=False)
    assert one_process.groups(1, 0) == plan.groups(1, 0) + plan.groups(1, 1)  # the same global batch


def test_padded_passes_are_the_groups_one_example_a_row():
    layout = PassLayout(rows_per_pass=3, row_length=256, packing=False)
    assert passes([[4, 0, 7], [2, 9, 1]], LENGTHS, layout) == [[[4], [0], [7]], [[2], [9], [1]]]


def test_packed_passes_fill_rows_and_take_rows_per_pass_rows():
    groups = [list(range(start, start + 4)) for start in range(0, 20, 4)]  # 5 groups of 4: 20 examples
    layout = PassLayout(rows_per_pass=4, row_length=256, packing=True)
    packed = passes(groups, LENGTHS, layout)
    rows = [row for one_pass in packed for row in one_pass]
    assert sorted(i for row in rows for i in row) == list(range(20))
    assert all(sum(LENGTHS[i] for i in row) <= 256 for row in rows)
    assert [len(one_pass) for one_pass in packed] == [4, 4]  # 1,964 tokens in 8 rows: 2 passes, not 5
    one_row = passes(groups, LENGTHS, PassLayout(rows_per_pass=4, row_length=256, packing=True, one_row=True))
    assert one_row == [[[i for row in one_pass for i in row]] for one_pass in packed]


def test_evaluation_passes_take_every_example_once_shortest_first():
    layout = PassLayout(rows_per_pass=5, row_length=256, packing=False)
    evaluated = [row[0] for one_pass in evaluation_passes(LENGTHS, layout) for row in one_pass]
    assert evaluated == sorted(range(len(LENGTHS)), key=lambda i: LENGTHS[i])
    packed = evaluation_passes(LENGTHS, PassLayout(rows_per_pass=5, row_length=256, packing=True))
    assert sorted(i for one_pass in packed for row in one_pass for i in row) == list(range(len(LENGTHS)))


def test_collate_gives_packed_rows_positions_and_padded_rows_a_mask(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    rows = [{"instruction": "Hi.", "input": "", "output": "Hello."},
            {"instruction": "Count to three.", "input": "", "output": "One, two, three."}]
    examples = tokenize_rows(rows, tokenizer, load_template("alpaca_short"), 256, False).examples
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    packed = collate([[0, 1]], examples, tokenizer.pad_token_id, PassLayout(2, 256, packing=True))
    assert set(packed) == {"input_ids", "position_ids", "targets"} and packed["input_ids"].shape == (1, -(-(n0 + n1) // 64) * 64)
    assert packed["position_ids"][0, n0 + n1:].tolist() == list(range(packed["input_ids"].shape[1] - n0 - n1))  # the filler: a segment of its own
    assert packed["position_ids"][0, :n0 + n1].tolist() == list(range(n0)) + list(range(n1))
    padded = collate([[0], [1]], examples, tokenizer.pad_token_id, PassLayout(2, 256, packing=False))
    assert set(padded) == {"input_ids", "attention_mask", "targets"}
    assert padded["attention_mask"].sum(dim=1).tolist() == [n0, n1]
    assert torch.equal(padded["targets"][0, :n0], packed["targets"][0, :n0])
