import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, FakeAPI, ok
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_lora.evaluate import JudgeConfig, heldout_loss, judge, pair_order, parse_verdict, wilson_interval
from alpaca_lora.templates import load_template

QUIET = dict(write=lambda *a: None)


def test_loss_equals_a_hand_computed_loss(tiny_base, tiny_adapter, alpaca_rows, tmp_path):
    rows = alpaca_rows[:6]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    result = heldout_loss(str(tiny_adapter), str(path), cutoff_len=512, micro_batch_size=2, bf16=False, **QUIET)
    # by hand: each row's response tokens scored by base + adapter, summed, divided by their count
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_adapter)
    template, total, count = load_template("alpaca"), 0.0, 0
    for row in rows:
        prompt = [1] + tokenizer(template.prompt(row["instruction"], row["input"]), add_special_tokens=False)["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [2]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        log_probs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        total -= log_probs[torch.arange(len(response)), torch.tensor(response)].sum().item()
        count += len(response)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["target_tokens"] == count and result["perplexity"] == pytest.approx(2.718281828 ** (total / count))


def test_verdicts_are_read_from_the_last_verdict_line():
    assert parse_verdict("A is longer but B is right.\nVerdict: B") == "B"
    assert parse_verdict("verdict: a ... on reflection\n**Verdict:** tie") == "tie"
    assert parse_verdict("I prefer the first one.") is None


def test_wilson_interval():
    low, high = wilson_interval(90, 179)
    assert low == pytest.approx(0.4300, abs=1e-3) and high == pytest.approx(0.5756, abs=1e-3)


@pytest.fixture
def answer_files(tmp_path):
    instructions = [(f"Instruction number {i}.", "some input" if i % 3 == 0 else "") for i in range(40)]
    ours = tmp_path / "ours.jsonl"
    ours.write_text("\n".join(json.dumps({"instruction": i, "input": x, "output": f"ours {n}"})
                              for n, (i, x) in enumerate(instructions[:38] + [("Only ours.", "")])))
    reference = tmp_path / "reference.jsonl"
    reference.write_text("\n".join(json.dumps({"prompt": "p", "instruction": i, "input": x, "response": f"theirs {n}",
                                               "target": ""})
                                   for n, (i, x) in enumerate(instructions)))
    return ours, reference


def _config(tmp_path, answer_files, api, **overrides):
    ours, reference = answer_files
    settings = dict(answers=str(ours), reference=str(reference), base_url=api.url if api else "",
                    output_dir=str(tmp_path / "judged"), request_batch_size=4, request_timeout=5, max_retries=3)
    return JudgeConfig(**{**settings, **overrides})


def test_order_is_randomised_per_pair_balanced_and_reproducible(tmp_path, answer_files, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = FakeAPI([ok("Both fine; the first is clearer.\nVerdict: A")])  # always prefers whatever is shown first
    try:
        report = judge(_config(tmp_path, answer_files, api), **QUIET)
    finally:
        api.close()
    keys = [(f"Instruction number {i}.", "some input" if i % 3 == 0 else "") for i in range(38)]
    ours_first = sum(pair_order(0, k) for k in keys)
    assert report["all"]["wins"] == ours_first and report["all"]["losses"] == 38 - ours_first
    assert 10 <= ours_first <= 28  # balanced: a coin per pair
    assert [pair_order(0, k) for k in keys] == [pair_order(0, k) for k in keys]
    assert [pair_order(1, k) for k in keys] != [pair_order(0, k) for k in keys]
    shown = [c["body"]["messages"][0]["content"] for c in api.calls]
    assert sum("Answer A:\nours" in s for s in shown) == ours_first  # what the judge saw follows the coin
    assert report["answers_without_reference"] == [["Only ours.", ""]]
    assert report["references_without_answer"] == [["Instruction number 38.", ""], ["Instruction number 39.", "some input"]]
    assert report["with_input"]["judged"] + report["without_input"]["judged"] == 38
    assert (tmp_path / "judged" / "report.md").read_text().startswith("Judge: gpt-4o-mini; 38 pairs")


def test_both_orders_turn_position_bias_into_ties(tmp_path, answer_files, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = FakeAPI([ok("Verdict: A")])
    try:
        report = judge(_config(tmp_path, answer_files, api, both_orders=True), **QUIET)
    finally:
        api.close()
    assert report["all"] | {} == {**report["all"], "wins": 0, "losses": 0, "ties": 38}
    assert len(api.calls) == 76


def test_malformed_verdicts_errors_and_resume(tmp_path, answer_files, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    flaky = FakeAPI([(429, {"error": {"message": "slow"}}, {"Retry-After": "0.1"}, 0),
                     (500, {"error": {"message": "oops"}}, {}, 0), ok("I cannot decide."), ok("Verdict: tie")])
    try:
        first = judge(_config(tmp_path, answer_files, flaky, max_cost_usd=0.002), **QUIET)
    finally:
        flaky.close()
    # one batch of 4 requests spent 0.0018 USD; the next 4 went over 0.002: 8 judged, one of them unreadable, and
    # the 429 and the 500 were retried by the client (10 requests)
    assert (first["all"]["judged"], first["unjudged"], len(flaky.calls)) == (7, 38 - 7, 10)
    asked_before = len(flaky.calls)
    second_api = FakeAPI([ok("Verdict: tie")])
    try:
        second = judge(_config(tmp_path, answer_files, second_api), **QUIET)
    finally:
        second_api.close()
    cached = sum(1 for line in (tmp_path / "judged" / "verdicts.jsonl").read_text().splitlines()
                 if json.loads(line)["outcome"] is not None) - len(second_api.calls)
    assert (cached, asked_before, len(second_api.calls)) == (7, 10, 38 - 8)  # the 8 already judged were not asked
    assert second["all"]["judged"] == 38 - 1  # the unreadable verdict stays cached as unreadable
    assert second["unjudged"] == 1


def test_human_judging_through_the_terminal(tmp_path, answer_files):
    ours, reference = answer_files
    keys = [(f"Instruction number {i}.", "some input" if i % 3 == 0 else "") for i in range(38)]
    # press a (first shown) for every pair: a win exactly where ours was shown first
    presses = "x\n" + "a\n" * 5 + "q\n"
    run = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "judge", "--answers", str(ours), "--reference",
                          str(reference), "--judge", "human", "--output_dir", str(tmp_path / "h")],
                         input=presses, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--- Answer A ---" in run.stdout and "Better? [a/b/t/q]" in run.stdout
    report = json.loads((tmp_path / "h" / "report.json").read_text())
    judged = sorted(keys)[:5]
    assert report["all"]["judged"] == 5 and report["all"]["wins"] == sum(pair_order(0, k) for k in judged)
    again = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "judge", "--answers", str(ours), "--reference",
                            str(reference), "--judge", "human", "--output_dir", str(tmp_path / "h")],
                           input="t\n" * 40, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "33 pairs to judge" in again.stdout
    assert json.loads((tmp_path / "h" / "report.json").read_text())["all"]["judged"] == 38


def test_the_self_instruct_eval_set_matches_its_reference_answers():
    from conftest import SHARED

    eval_file = SHARED / "data" / "eval" / "user_oriented_instructions.jsonl"
    predictions = SHARED / "data" / "eval" / "text-davinci-003_predictions.jsonl"
    if not eval_file.exists():
        pytest.skip(f"{eval_file} is absent (../shared is not beside this clone)")
    from alpaca_lora.data import load_rows, validate_rows
    from alpaca_lora.evaluate import load_answers

    rows, _ = validate_rows(load_rows(str(eval_file)), skip_bad_rows=False)
    keys = {(r["instruction"].strip(), r["input"].strip()) for r in rows}
    reference = load_answers(str(predictions))
    assert len(rows) == 252 and keys == set(reference)


def test_a_dead_judge_stops_with_one_line_and_no_report(tmp_path, answer_files, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = FakeAPI([(500, {"error": {"message": "down"}}, {}, 0)])
    try:
        with pytest.raises(ValueError, match=r"every request of a batch failed after 1 retries each"):
            judge(_config(tmp_path, answer_files, api, max_retries=1), **QUIET)
    finally:
        api.close()
    assert len(api.calls) == 4 * 2 and not (tmp_path / "judged" / "report.json").exists()


def test_loss_on_conversations_uses_the_adapters_template_and_trains_only_answers(tiny_base, tiny_chat_adapter,
                                                                                  tmp_path):
    """evaluate.py loss on the chat adapter's own validation rows: the loss of base + adapter on the assistant
    tokens (and end-of-turn) of each conversation, rendered with the adapter's template."""
    from alpaca_lora.chat_template import ChatTemplate
    from alpaca_lora.data import IGNORE_INDEX, tokenize_rows

    rows_file = tiny_chat_adapter / "validation_rows.json"
    rows = json.loads(rows_file.read_text())
    assert rows and all("messages" in row for row in rows)
    result = heldout_loss(str(tiny_chat_adapter), str(rows_file), cutoff_len=512, micro_batch_size=2, bf16=False,
                          **QUIET)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_chat_adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_adapter)
    chat = ChatTemplate("mistral", (tiny_chat_adapter / "chat_template.jinja").read_text())
    total, count = 0.0, 0
    for example in tokenize_rows(rows, tokenizer, chat, 512, False).examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids.tolist()])).logits[0]
        targets = torch.tensor(example.targets.tolist())
        kept = targets != IGNORE_INDEX
        total -= torch.log_softmax(logits[kept], dim=-1)[torch.arange(int(kept.sum())), targets[kept]].sum().item()
        count += int(kept.sum())
    assert result["loss"] == pytest.approx(total / count, rel=1e-5) and result["target_tokens"] == count
