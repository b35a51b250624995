import json

import pytest
from conftest import ALPACA_CLEANED, ALPACA_ORIGINAL, REPO, needs_shared

from alpaca_lora.data import IGNORE_INDEX, load_rows, split_rows, tokenize_rows, validate_rows
from alpaca_lora.model import load_tokenizer
from alpaca_lora.templates import load_template


def test_json_and_jsonl_give_the_same_rows(tmp_path, alpaca_rows):
    as_json, as_jsonl = tmp_path / "a.json", tmp_path / "a.jsonl"
    as_json.write_text(json.dumps(alpaca_rows))
    as_jsonl.write_text("\n".join(json.dumps(r) for r in alpaca_rows) + "\n\n")
    assert load_rows(str(as_json)).rows == load_rows(str(as_jsonl)).rows == alpaca_rows
    assert len(load_rows(str(as_json)).sha256) == 64


def test_seed_tasks_become_one_row_per_instance(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text(json.dumps({"id": "t", "name": "n", "instruction": "Add.", "is_classification": False,
                                "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}]}))
    loaded = load_rows(str(path))
    assert loaded.rows == [{"instruction": "Add.", "input": "1+1", "output": "2"},
                           {"instruction": "Add.", "input": "2+2", "output": "4"}]
    assert loaded.row_numbers == [1, 1]


def test_the_project_seed_tasks_are_complete_and_valid():
    lines = (REPO / "data" / "seed_tasks.jsonl").read_text().splitlines()
    tasks = [json.loads(line) for line in lines]
    assert len(tasks) >= 175
    assert len({t["id"] for t in tasks}) == len({t["name"] for t in tasks}) == len(tasks)
    for task in tasks:
        assert set(task) == {"id", "name", "instruction", "instances", "is_classification"}
        assert isinstance(task["is_classification"], bool)
    with_input = sum(bool(t["instances"][0]["input"]) for t in tasks)
    assert 0.25 < with_input / len(tasks) < 0.45  # about a third have an input
    rows, bad = validate_rows(load_rows(str(REPO / "data" / "seed_tasks.jsonl")), skip_bad_rows=False)
    assert bad == 0 and len(rows) == len(tasks)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(ValueError, match=r"bad.json: malformed JSON at line 3 column 23: Expecting .,. delimiter"):
        load_rows(str(path))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: malformed JSON at line 2 column 17"):
        load_rows(str(lines))


def test_bad_rows_are_named_by_number_and_reason(tmp_path):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "", "output": "x"}, {"output": "x"},
            {"instruction": "a", "input": 3, "output": "x"}, {"instruction": "a", "output": None}, "text"]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError) as error:
        validate_rows(load_rows(str(path)), skip_bad_rows=False)
    message = str(error.value)
    assert message.startswith(f"{path}: 5 bad row(s) of 6: row 2: 'instruction' is empty; row 3: 'instruction' is missing; "
                              "row 4: 'input' is not a string (int); row 5: 'output' is missing; row 6: expected an object")
    assert "--skip_bad_rows" in message
    good, dropped = validate_rows(load_rows(str(path)), skip_bad_rows=True)
    assert good == [{"instruction": "ok", "input": "", "output": "fine"}] and dropped == 5


def test_jsonl_bad_rows_are_named_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match="row 3: 'output' is missing"):
        validate_rows(load_rows(str(path)), skip_bad_rows=False)


def test_missing_file_and_unreachable_dataset_id(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--data_path .*nope.json: no such file"):
        load_rows(str(tmp_path / "nope.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"--data_path 'yahma/alpaca-cleaned': not a local file.*pass the local .json"):
        load_rows("yahma/alpaca-cleaned")


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="no usable rows"):
        validate_rows(load_rows(str(path)), skip_bad_rows=False)


def test_validation_split_is_seeded_and_disjoint(alpaca_rows):
    train, val = split_rows(alpaca_rows, 10, seed=1)
    again_train, again_val = split_rows(alpaca_rows, 10, seed=1)
    assert (train, val) == (again_train, again_val)
    assert len(val) == 10 and len(train) == len(alpaca_rows) - 10
    assert {json.dumps(r) for r in train}.isdisjoint(json.dumps(r) for r in val)
    assert split_rows(alpaca_rows, 10, seed=2)[1] != val
    assert split_rows(alpaca_rows, 0, seed=1) == (alpaca_rows, [])
    with pytest.raises(ValueError, match=r"--val_set_size 48 is not smaller than the 48 usable rows"):
        split_rows(alpaca_rows, 48, seed=1)


def test_targets_mask_exactly_the_prompt(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    template = load_template("alpaca")
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    [example] = tokenize_rows([row], tokenizer, template, 256, train_on_inputs=False).examples
    prompt = [tokenizer.bos_token_id] + tokenizer(template.prompt(row["instruction"]), add_special_tokens=False)["input_ids"]
    response = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert example.input_ids.tolist() == prompt + response + [tokenizer.eos_token_id]
    # position i is trained to predict token i+1: the last prompt position predicts the first response token
    assert example.targets.tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + response + [tokenizer.eos_token_id, IGNORE_INDEX]
    [with_inputs] = tokenize_rows([row], tokenizer, template, 256, train_on_inputs=True).examples
    assert with_inputs.targets.tolist() == example.input_ids[1:].tolist() + [IGNORE_INDEX]


def test_truncated_examples_lose_eos_and_are_counted(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    template = load_template("alpaca_short")
    rows = [{"instruction": "Hi.", "input": "", "output": "Hello."},
            {"instruction": "Write.", "input": "", "output": "word " * 200},
            {"instruction": "long " * 300, "input": "", "output": "x"}]
    tokenized = tokenize_rows(rows, tokenizer, template, 64, train_on_inputs=False)
    assert (tokenized.num_truncated, tokenized.num_without_targets, tokenized.num_fitting) == (2, 1, 1)
    fitting, cut = tokenized.examples
    assert fitting.targets[-2] == tokenizer.eos_token_id and not fitting.truncated
    assert cut.truncated and len(cut.input_ids) == 64 and tokenizer.eos_token_id not in cut.input_ids


@pytest.mark.parametrize("data_file", [pytest.param(path, marks=needs_shared(path)) for path in (ALPACA_CLEANED, ALPACA_ORIGINAL)],
                         ids=["cleaned", "original"])
@pytest.mark.parametrize("template_name", ["alpaca", "alpaca_legacy", "chat template alpaca"])
def test_trained_tokens_decode_to_exactly_the_response_and_eos(llama_tokenizer, data_file, template_name):
    """With the real LLaMA tokenizer, on every real Alpaca row: the unmasked labels are the response, then EOS; also
    with the rows as one-turn conversations under the alpaca chat template."""
    from alpaca_lora.chat_template import load_chat_template

    rows, _ = validate_rows(load_rows(str(data_file)), skip_bad_rows=False)
    template = (load_chat_template("alpaca", llama_tokenizer) if template_name.startswith("chat")
                else load_template(template_name))
    examples = tokenize_rows(rows, llama_tokenizer, template, 100_000, False).examples
    assert len(examples) == len(rows) > 2000
    for row, example in zip(rows, examples):
        trained = [t for t in example.targets if t != IGNORE_INDEX]
        assert llama_tokenizer.decode(trained) == row["output"] + "</s>"
        assert example.input_ids[0] == llama_tokenizer.bos_token_id == 1
        assert trained[-1] == llama_tokenizer.eos_token_id == 2


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_not_data(tmp_path, alpaca_rows, suffix):
    path = tmp_path / f"rows{suffix}"
    text = json.dumps(alpaca_rows[:3]) if suffix == ".json" else "\n".join(json.dumps(r) for r in alpaca_rows[:3])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_rows(str(path)).rows == alpaca_rows[:3]


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "Caf\u00e9?", "output": "oui"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"--data_path {path}: not UTF-8 \(byte 0xe9 at offset 21\); save it as UTF-8"):
        load_rows(str(path))


def test_a_line_cut_short_is_a_bad_row_that_skip_bad_rows_drops(tmp_path, alpaca_rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in alpaca_rows[:4]) + "\n" + json.dumps(alpaca_rows[4])[:30])
    with pytest.raises(ValueError, match=r"malformed JSON at line 5 column \d+: .*pass --skip_bad_rows"):
        load_rows(str(path))
    good, dropped = validate_rows(load_rows(str(path), skip_malformed_lines=True), skip_bad_rows=True)
    assert good == alpaca_rows[:4] and dropped == 1
    with pytest.raises(ValueError, match=r"1 bad row\(s\) of 5: row 5: malformed JSON at column"):
        validate_rows(load_rows(str(path), skip_malformed_lines=True), skip_bad_rows=False)


def test_copies_of_a_row_stay_on_one_side_of_the_split(alpaca_rows):
    from alpaca_lora.data import duplicate_rows

    rows = alpaca_rows + [alpaca_rows[0]] * 60  # 60 copies of one row, as a probe found
    assert duplicate_rows(rows) == 60 and duplicate_rows(alpaca_rows) == 0
    for seed in range(20):
        train, val = split_rows(rows, 10, seed=seed)
        copies_in_val = sum(r == alpaca_rows[0] for r in val)
        assert copies_in_val in (0, 61) and sum(r == alpaca_rows[0] for r in train) == 61 - copies_in_val
        assert len({json.dumps(r) for r in val}) == 10 and len(train) + len(val) == len(rows)
    # without repeats the split is the plain draw it always was
    assert split_rows(alpaca_rows, 10, seed=1)[1] == [alpaca_rows[i] for i in sorted(
        __import__("random").Random(1).sample(range(48), 10))]


def test_with_a_chat_template_train_on_inputs_trains_every_token_and_truncation_is_counted(tiny_base):
    """The conversation path follows the same rules as Alpaca rows: --train_on_inputs trains the whole text, and an
    example cut at cutoff_len loses its tail (and end-of-turn) and is counted."""
    from conftest import conversations

    from alpaca_lora.chat_template import load_chat_template

    tokenizer = load_tokenizer(str(tiny_base))
    chat = load_chat_template("mistral", tokenizer)
    rows = conversations()
    everything = tokenize_rows(rows, tokenizer, chat, 512, train_on_inputs=True)
    for example in everything.examples:
        assert example.targets.tolist() == example.input_ids.tolist()[1:] + [IGNORE_INDEX]
    answers = tokenize_rows(rows, tokenizer, chat, 512, train_on_inputs=False)
    assert all(0 < e.num_targets < len(e.input_ids) - 1 for e in answers.examples)
    cut = tokenize_rows(rows, tokenizer, chat, 20, train_on_inputs=False)
    assert cut.num_truncated == 3 and all(len(e.input_ids) == 20 for e in cut.examples)
    assert all(tokenizer.eos_token_id not in e.targets.tolist()[-3:] for e in cut.examples)
