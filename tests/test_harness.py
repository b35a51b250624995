"""evaluate.py harness: lm-evaluation-harness in-process on base + adapter, the same scores through our server, the
report and the model card."""

import json
import shutil
from pathlib import Path

import pytest

from alpaca_lora.harness import CARD_END, CARD_START, HarnessConfig, run_harness, with_harness_section

TASKS = Path(__file__).resolve().parent / "harness_task"  # alpaca_lora_choice: 12 questions, data beside the YAML
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[harness]'")


@pytest.fixture(scope="module")
def scored(tiny_adapter, tmp_path_factory):
    """The local task scored in-process, on a copy of the adapter (its model card gets the scores)."""
    adapter = tmp_path_factory.mktemp("harness") / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    output = adapter.parent / "evaluation"
    report = run_harness(HarnessConfig(lora_weights=str(adapter), tasks="alpaca_lora_choice", include_path=str(TASKS),
                                       bf16=False, batch_size=4, output_dir=str(output)), write=lambda *_: None)
    return adapter, output, report


def test_in_process_and_through_the_server_agree(scored):
    """lm_eval's local-completions model (token ids with BOS, echo, logprobs) against /v1/completions: every
    log-likelihood as in-process (fp32, 1e-4), and so the same accuracies; both equal the log-probabilities the
    generator computes for BOS + question + answer."""
    from lm_eval.tasks import TaskManager

    from alpaca_lora.generate import Generator
    from alpaca_lora.server import Server

    adapter, output, report = scored
    generator = Generator(lora_weights=str(adapter), bf16=False, device="cpu")
    server = Server(generator, "127.0.0.1", 0).start()
    try:
        served = lm_eval.simple_evaluate(model="local-completions", model_args={
            "base_url": f"http://127.0.0.1:{server.port}/v1/completions", "model": generator.name,
            "tokenizer": str(adapter), "tokenizer_backend": "huggingface", "add_bos_token": True,
            "num_concurrent": 1, "max_retries": 1}, tasks=["alpaca_lora_choice"],
            task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    finally:
        server.stop()
    in_process = [json.loads(line) for line in (output / "harness_samples.jsonl").read_text().splitlines()]
    through_server = sorted(served["samples"]["alpaca_lora_choice"], key=lambda sample: sample["doc_id"])
    assert len(in_process) == len(through_server) == 12
    for mine, theirs in zip(in_process, through_server):
        assert mine["doc_id"] == theirs["doc_id"]
        assert [ll for ll, _ in mine["filtered_resps"]] == pytest.approx(
            [ll for ll, _ in theirs["filtered_resps"]], abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["alpaca_lora_choice"][metric] == report["results"]["alpaca_lora_choice"][metric]
    context, continuation = in_process[0]["arguments"][0]
    whole, start = generator.text_ids(context + continuation), len(generator.text_ids(context))
    direct = sum(logprob for _, logprob, _ in generator.token_logprobs(whole, start))
    assert in_process[0]["filtered_resps"][0][0] == pytest.approx(direct, abs=1e-4)


def test_the_report_and_the_model_card(scored):
    adapter, output, report = scored
    written = json.loads((output / "harness.json").read_text())
    accuracy = written["results"]["alpaca_lora_choice"]["acc,none"]
    assert written["samples"] == {"alpaca_lora_choice": 12} and written["dtype"] == "float32"
    # 12 questions: the accuracy is a count of right answers out of 12, as the samples file says
    right = sum(json.loads(line)["acc"] for line in (output / "harness_samples.jsonl").read_text().splitlines())
    assert accuracy == pytest.approx(right / 12)
    card = (adapter / "README.md").read_text()
    assert f"| alpaca_lora_choice | acc | {accuracy:.4f} ± " in card and "| 12 |" in card
    assert card.index(CARD_START) < card.index("## Training arguments")  # the training card keeps its sections


def test_a_rerun_replaces_the_card_section():
    card = "# Adapter\n\n## Evaluation\n- loss\n\n## Training arguments\n| flag |\n"
    once = with_harness_section(card, "first table\n")
    twice = with_harness_section(once, "second table\n")
    assert twice.count(CARD_START) == twice.count(CARD_END) == 1 and "first table" not in twice
    assert twice == card.replace("\n## Training arguments", f"\n{CARD_START}\n## lm-evaluation-harness\n\nsecond "
                                                          f"table\n{CARD_END}\n\n## Training arguments")
    assert with_harness_section("", "t\n") == f"{CARD_START}\n## lm-evaluation-harness\n\nt\n{CARD_END}\n"


@pytest.mark.parametrize("flags, says", [
    ({"tasks": ""}, "--tasks '': name at least one lm-evaluation-harness task"),
    ({"tasks": "no_such_task"}, "--tasks no_such_task: no such lm-evaluation-harness task"),
    ({"tasks": "alpaca_lora_choice", "include_path": "/no/such/folder"}, "--include_path /no/such/folder: no such folder"),
    ({"tasks": "alpaca_lora_choice", "limit": 0}, "--limit 0: must be a number > 0"),
    ({"tasks": "alpaca_lora_choice", "num_fewshot": -1}, "--num_fewshot -1: must be a whole number >= 0"),
])
def test_bad_flags_are_one_line_errors(tiny_adapter, tmp_path, flags, says):
    with pytest.raises(ValueError, match=f"^{says}".replace("(", r"\(").replace(")", r"\)")):
        run_harness(HarnessConfig(lora_weights=str(tiny_adapter), output_dir=str(tmp_path), **flags))
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_hub_task_without_network_is_a_one_line_error(tiny_adapter, tmp_path):
    """arithmetic_1dc's data is on the Hugging Face hub, which this machine cannot reach (skipped where it can)."""
    import socket

    try:
        socket.getaddrinfo("huggingface.co", 443)
        pytest.skip("the hub is reachable from here: a hub task would load")
    except OSError:
        pass
    with pytest.raises(ValueError, match=r"^--tasks arithmetic_1dc: the data could not be loaded \(.*\); without "
                                         "network only tasks whose data is on this machine work"):
        run_harness(HarnessConfig(lora_weights=str(tiny_adapter), tasks="arithmetic_1dc", output_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir())


def test_the_command_line_error_is_one_line(tiny_adapter, tmp_path):
    from conftest import run_script

    result = run_script("evaluate.py", "harness", "--lora_weights", tiny_adapter, "--tasks", "no_such_task",
                        "--output_dir", tmp_path / "out")
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(
        "evaluate.py: error: --tasks no_such_task: no such lm-evaluation-harness task")
