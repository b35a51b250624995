import json
import os
import re

import pytest
from conftest import REPO, run_script

from alpaca_lora.adapter_folder import describe_adapter
from alpaca_lora.generate import Generator, Sampling
from alpaca_lora.generate_cli import answer_file

GREEDY = Sampling(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def generator(tiny_adapter):
    return Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu")


def test_the_adapter_folder_is_enough(tiny_adapter, tiny_base, generator):
    adapter = describe_adapter(str(tiny_adapter))
    assert (adapter.base_model, adapter.prompt_template) == (str(tiny_base), "alpaca")
    assert adapter.summary.steps == 2 and adapter.summary.data.rows == 48
    assert generator.template.name == "alpaca"
    assert type(generator.model).__name__ == "PeftModelForCausalLM"


def test_prompt_ids_are_the_training_layout(generator):
    ids = generator.instruction_ids("Name a colour.")
    assert ids[0] == generator.tokenizer.bos_token_id and ids[-1] != generator.tokenizer.eos_token_id
    assert generator.tokenizer.decode(ids[1:]) == generator.template.prompt("Name a colour.")
    assert generator.chat_template is None and generator.stop_ids == [generator.tokenizer.eos_token_id]


def test_each_answer_of_a_batch_equals_the_prompt_answered_alone(generator):
    prompts = [generator.instruction_ids(i) for i in ("Hi.", "Give three tips for staying healthy, please.", "Why?")]
    batched = generator.answer(prompts, GREEDY)
    for prompt, answer in zip(prompts, batched):
        alone = generator.answer([prompt], GREEDY)[0]
        assert answer == alone
    assert all(a.completion_tokens <= 12 and "</s>" not in a.text for a in batched)


def test_sampling_flags_mean_what_they_say(generator):
    prompt = [generator.instruction_ids("Tell a story.")]
    assert GREEDY.generate_kwargs()["do_sample"] is False
    hot = Sampling(temperature=5.0, top_k=0, top_p=1.0, max_new_tokens=12)
    assert hot.generate_kwargs()["do_sample"] is True
    assert generator.answer(prompt, GREEDY) == generator.answer(prompt, GREEDY)
    samples = {generator.answer(prompt, hot, seed=s)[0].text for s in range(4)}
    assert len(samples) > 1  # sampling at temperature 5 over a 512-token vocabulary varies
    assert generator.answer(prompt, hot, seed=7) == generator.answer(prompt, hot, seed=7)
    beams = generator.answer(prompt, Sampling(temperature=0.0, num_beams=3, max_new_tokens=12))[0]
    assert beams.completion_tokens > 0
    with pytest.raises(ValueError, match=r"--temperature -1: must be a number"):
        Sampling(temperature=-1).validated(100)
    with pytest.raises(ValueError, match=r"--max_new_tokens 500: must be a whole number in \[1, 100\]"):
        Sampling(max_new_tokens=500).validated(100)


def test_streamed_text_is_the_answer(generator):
    prompt = generator.instruction_ids("Say something.")
    pieces = list(generator.stream(prompt, GREEDY))
    answer = pieces[-1]
    assert "".join(pieces[:-1]).strip() == answer.text == generator.answer([prompt], GREEDY)[0].text


def test_batch_file_resumes_without_duplicates(generator, tmp_path, alpaca_rows):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in alpaca_rows[:5]))
    out = tmp_path / "answers.jsonl"
    assert answer_file(generator, str(rows), str(out), GREEDY, 2, None, progress=lambda m: None) == 5
    complete = out.read_text().splitlines()
    # an interrupted run: the last two answers lost, and half a line written
    out.write_text("\n".join(complete[:3]) + "\n" + complete[3][:20])
    assert answer_file(generator, str(rows), str(out), GREEDY, 2, None, progress=lambda m: None) == 2
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert resumed == [json.loads(line) for line in complete]
    assert [r["instruction"] for r in resumed] == [r["instruction"] for r in alpaca_rows[:5]]


def test_an_adapter_for_another_base_is_refused(tiny_adapter, tmp_path):
    from alpaca_lora.demo import DemoConfig, build_demo_model

    other = build_demo_model(DemoConfig(output_dir=str(tmp_path / "other"), vocab_size=512, hidden_size=96,
                                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        pretrain_steps=0))
    with pytest.raises(ValueError, match=r"--lora_weights .*does not fit --base_model"):
        Generator(base_model=str(other), lora_weights=str(tiny_adapter), bf16=False, device="cpu")
    with pytest.raises(ValueError, match=r"--lora_weights .*no adapter_config.json"):
        Generator(lora_weights=str(tmp_path), bf16=False, device="cpu")


def test_one_shot_and_interactive_from_the_command_line(tiny_adapter, generator):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    expected = generator.answer([generator.instruction_ids("Name a colour.")], GREEDY)[0].text
    one = run_script(REPO / "generate.py", "--lora_weights", tiny_adapter, "--instruction", "Name a colour.",
                     "--temperature", 0, "--max_new_tokens", 12, "--bf16", False, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout.strip().splitlines()[-1] == expected
    # notices from the libraries that no user can act on are not shown (see console._quiet_library_notices)
    assert "is_gradient_checkpointing" not in one.stderr and "gemm_4bit_forward" not in one.stderr
    session = __import__("subprocess").run(
        [__import__("sys").executable, str(REPO / "generate.py"), "--lora_weights", str(tiny_adapter),
         "--temperature", "0", "--max_new_tokens", "12", "--bf16", "False"],
        input="Name a colour.\n\nexit\n", capture_output=True, text=True, env=env, timeout=300)
    assert session.returncode == 0, session.stderr[-2000:]
    assert "Instruction: Input (optional): " + expected in session.stdout


def test_bad_input_file_is_one_line(tiny_adapter, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    result = run_script(REPO / "generate.py", "--lora_weights", tiny_adapter, "--input_file", bad,
                        "--output_file", tmp_path / "o.jsonl", "--bf16", False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"generate.py: error: {bad}: 1 bad row(s) of 1: row 1: 'output'")
    missing = run_script(REPO / "generate.py", "--lora_weights", tmp_path / "nothing")
    assert missing.returncode == 1 and "generate.py: error: --lora_weights" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (dict(max_batch=0), "--max_batch 0: must be a whole number >= 1"),
    (dict(max_queue=-1), "--max_queue -1: must be a whole number >= 0"),
    (dict(batch_size=True), "--batch_size True: must be a whole number >= 1"),
])
def test_server_and_batch_sizes_are_checked_before_loading(flags, message, monkeypatch):
    from alpaca_lora import generate_cli

    monkeypatch.setattr(generate_cli, "Generator", lambda *args, **kwargs: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        generate_cli.run_generate(generate_cli.GenerateConfig(lora_weights="x", serve=True, **flags))


def test_ctrl_c_stops_the_answer_not_the_session(generator, monkeypatch):
    from alpaca_lora import generate_cli

    seen_stop = []

    def interrupted_stream(prompt, sampling, seed, stop_event):
        yield "Once"
        seen_stop.append(stop_event)
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while it waits for the next token
    monkeypatch.setattr(generator, "stream", interrupted_stream)
    lines = iter(["Tell a long story.", "", "exit"])
    written = []
    generate_cli.interactive(generator, GREEDY, None, read=lambda prompt: next(lines),
                                write=lambda text="", end="\n", flush=False: written.append(text + end))
    assert "".join(written).endswith("Once [stopped]\n")
    assert seen_stop[0].is_set()  # the generation thread is told to stop


def test_a_base_model_that_moved_is_named_with_the_file_that_named_it(tiny_adapter, tmp_path):
    import json
    import shutil

    moved = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, moved)
    summary = json.loads((moved / "training_summary.json").read_text())
    (moved / "training_summary.json").write_text(json.dumps({**summary, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match=rf"--lora_weights {moved}: its training_summary.json names the base model "
                                         rf"{tmp_path}/gone, which is not there any more; pass --base_model"):
        Generator(lora_weights=str(moved), bf16=False, device="cpu")


def test_ctrl_c_in_a_batch_file_says_where_the_answers_are(tiny_adapter, tmp_path, monkeypatch):
    from alpaca_lora import generate_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate_cli, "Generator", lambda *args, **kwargs: None)
    monkeypatch.setattr(generate_cli, "answer_file", interrupted)
    (tmp_path / "in.json").write_text("[]")
    said = []
    generate_cli.run_generate(generate_cli.GenerateConfig(input_file=str(tmp_path / "in.json"),
                                                          output_file=str(tmp_path / "out.jsonl")), write=said.append)
    assert said == [f"stopped: the rows answered so far are in {tmp_path / 'out.jsonl'}; the same command resumes"]


@pytest.fixture(scope="module")
def chat_generator(tiny_chat_adapter):
    return Generator(lora_weights=str(tiny_chat_adapter), bf16=False, device="cpu")


def test_a_chat_adapter_renders_instructions_as_one_turn_conversations(chat_generator):
    from alpaca_lora.chat_template import prompt_text

    assert chat_generator.chat_template.name == "mistral"
    text = prompt_text(chat_generator.chat_template, chat_generator.tokenizer,
                       [{"role": "user", "content": "Translate.\n\nBonjour"}])
    assert chat_generator.instruction_ids("Translate.", "Bonjour") == chat_generator.text_ids(text)
    assert chat_generator.tokenizer.decode(chat_generator.instruction_ids("Hi")) == "<s>[INST] Hi [/INST]"


def test_the_interactive_chat_goes_on_and_starts_over(chat_generator, monkeypatch):
    from alpaca_lora import generate_cli

    prompts = []

    def recording_stream(prompt, sampling, seed, stop_event):
        prompts.append(chat_generator.tokenizer.decode(prompt))
        yield f" answer {len(prompts)}"
    monkeypatch.setattr(chat_generator, "stream", recording_stream)
    lines = iter(["Name a colour.", "And another?", "/new", "Hello", "exit"])
    generate_cli.interactive(chat_generator, GREEDY, None, read=lambda prompt: next(lines),
                             write=lambda text="", end="\n", flush=False: None)
    assert prompts == ["<s>[INST] Name a colour. [/INST]",
                       "<s>[INST] Name a colour. [/INST]answer 1</s>[INST] And another? [/INST]",
                       "<s>[INST] Hello [/INST]"]


def test_a_file_of_conversations_is_answered_up_to_each_last_answer(chat_generator, tmp_path):
    from conftest import conversations

    from alpaca_lora.generate_cli import answer_file

    rows = tmp_path / "chats.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in conversations()))
    out = tmp_path / "answers.jsonl"
    assert answer_file(chat_generator, str(rows), str(out), GREEDY, 2, 0, progress=lambda *a: None) == 3
    assert answer_file(chat_generator, str(rows), str(out), GREEDY, 2, 0, progress=lambda *a: None) == 0  # resumed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    first = conversations()[1]["messages"]
    expected = chat_generator.answer([chat_generator.conversation_ids(first[:-1])], GREEDY)[0].text
    assert records[1] == {"messages": first[:-1], "output": expected, "reference": first[-1]["content"],
                          "finish_reason": records[1]["finish_reason"]}
