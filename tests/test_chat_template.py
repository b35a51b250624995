"""Chat templates: for every vendor template in ../shared and every shipped one, with its family's real vocabulary,
training trains exactly each assistant message and its end-of-turn marker, and the prompt at inference is, token
for token, the context training saw before the same answer."""

import pytest
from conftest import REPO, TEMPLATE_VOCABULARIES, VOCABULARIES, chat_template_path, conversations, supports_system

from alpaca_lora.chat_template import (FIXED_DATE, available_chat_templates, bos_ids, check_chat_template_name,
                                       end_of_turn_ids, load_chat_template, prompt_text, render,
                                       render_conversation)
from alpaca_lora.data import IGNORE_INDEX, tokenize_rows

# templates whose earlier turns render differently once the conversation goes on, so that only the last answer's
# prompt can equal training's: Qwen3 gives the last answer an empty think block
LAST_TURN_ONLY = {"Qwen-Qwen3-0.6B.jinja"}
THINKING_SWITCH = {"Qwen-Qwen3-0.6B.jinja", "HuggingFaceTB-SmolLM3-3B.jinja"}


@pytest.fixture(scope="module")
def tokenizer_of(vocabulary):
    from transformers import AutoTokenizer

    loaded = {}

    def tokenizer(template: str):
        name = TEMPLATE_VOCABULARIES[template]
        if name not in loaded:
            loaded[name] = AutoTokenizer.from_pretrained(vocabulary(name))
        return loaded[name]
    return tokenizer


def _rows(template: str) -> list[dict]:
    rows = conversations()
    if not supports_system(template):
        rows = [{"messages": [m for m in row["messages"] if m["role"] != "system"]} for row in rows]
    return rows


def _trained_runs(example) -> list[tuple[int, list[int]]]:
    """(position in input_ids of the first trained token, the trained tokens) for each stretch of trained tokens."""
    runs, current = [], None
    for i, target in enumerate(example.targets.tolist()):
        if target == IGNORE_INDEX:
            current = None
        elif current is None:
            current = (i + 1, [target])  # targets[i] is the label of input position i + 1
            runs.append(current)
        else:
            current[1].append(target)
    return runs


@pytest.mark.parametrize("template", TEMPLATE_VOCABULARIES)
def test_trained_tokens_are_each_assistant_message_and_its_end_of_turn_marker(template, tokenizer_of):
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    rows = _rows(template)
    examples = tokenize_rows(rows, tokenizer, chat, 4096, train_on_inputs=False).examples
    marker = tokenizer.convert_ids_to_tokens(end_of_turn_ids(chat, tokenizer)[0])
    assert len(examples) == len(rows)
    for row, example in zip(rows, examples):
        answers = [m["content"] + marker for m in row["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(tokens) for _, tokens in _trained_runs(example)] == answers
        ids = example.input_ids.tolist()
        bos = bos_ids(tokenizer)
        assert ids.count(tokenizer.bos_token_id) == len(bos) and ids[:len(bos)] == bos  # BOS exactly once, first


@pytest.mark.parametrize("template", TEMPLATE_VOCABULARIES)
def test_the_inference_prompt_is_the_context_training_saw(template, tokenizer_of):
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    rows = _rows(template)
    for row, example in zip(rows, tokenize_rows(rows, tokenizer, chat, 4096, False).examples):
        messages, ids = row["messages"], example.input_ids.tolist()
        answer_starts = [start for start, _ in _trained_runs(example)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, (k, start) in enumerate(zip(turns, answer_starts)):
            text = prompt_text(chat, tokenizer, messages[:k])
            prompt = bos_ids(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]
            last = turn == len(turns) - 1
            if last or template not in LAST_TURN_ONLY:
                assert prompt == ids[:start], (template, turn)


@pytest.mark.parametrize("template", TEMPLATE_VOCABULARIES)
def test_each_templates_own_generation_prompt_is_trainings_prompt(template, tokenizer_of):
    """What a server renders (the template's generation prompt, with the variables llama.cpp passes: thinking on,
    today's date) is the prompt the last answer was trained after. Qwen3 and SmolLM3 get their thinking switch set
    for that; the others need nothing."""
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    assert chat.source.startswith("{%- set enable_thinking = ") == (template in THINKING_SWITCH)
    for messages in (row["messages"] for row in _rows(template)):
        history = messages[:-1]
        served = tokenizer.apply_chat_template(history, chat_template=chat.source, tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True,
                                               date_string="30 Nov 2026")
        assert served == prompt_text(chat, tokenizer, history)


def test_a_template_that_reads_the_clock_renders_the_same_date_every_day(tokenizer_of):
    """Llama 3.2's template prints today's date; loaded, it carries a fixed one, so any renderer of the saved
    template (here transformers' own, with no extra arguments) writes what training saw."""
    template = "meta-llama-Llama-3.2-3B-Instruct.jinja"
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    assert f"Today Date: {FIXED_DATE}" in prompt_text(chat, tokenizer, [{"role": "user", "content": "Hi"}])
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=chat.source, tokenize=False)
    assert f"Today Date: {FIXED_DATE}\n" in plain and plain.startswith("<|begin_of_text|><|start_header_id|>")
    # llama.cpp passes today's date as date_string: the fixed one still wins
    dated = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=chat.source, tokenize=False,
                                          date_string="30 Nov 2026")
    assert dated == plain
    chatml = load_chat_template("chatml", tokenizer_of("chatml"))
    assert chatml.source == (REPO / "templates" / "chatml.jinja").read_text()  # the clock-free ones stay as they are


def test_shipped_templates_are_listed_and_unknown_names_say_what_exists(tmp_path):
    assert {"alpaca", "chatml", "gemma", "llama3", "mistral", "phi3"} <= set(available_chat_templates())
    with pytest.raises(ValueError, match=r"--chat_template 'vicuna': no such template; use tokenizer .*chatml.*\.jinja"):
        check_chat_template_name("vicuna")
    with pytest.raises(ValueError, match=r"--chat_template .*missing\.jinja: no such file"):
        check_chat_template_name(str(tmp_path / "missing.jinja"))


def test_the_alpaca_chat_template_is_the_alpaca_prompt(tokenizer_of):
    from alpaca_lora.templates import load_template

    tokenizer = tokenizer_of("alpaca")
    chat = load_chat_template("alpaca", tokenizer)
    assert prompt_text(chat, tokenizer, [{"role": "user", "content": "Name a colour."}]) == \
        load_template("alpaca").prompt("Name a colour.")


def test_a_template_whose_marker_is_not_a_token_is_refused(tokenizer_of):
    """ChatML on LLaMA's vocabulary: <|im_end|> is plain text there, so the model could never learn to stop."""
    tokenizer = tokenizer_of("mistral")  # LLaMA's SentencePiece vocabulary
    chat = load_chat_template("chatml", tokenizer)
    with pytest.raises(ValueError, match=r"chat template chatml: it writes no special token of this tokenizer after "
                                         r"an assistant message \('<\|im_end\|>\\n'\)"):
        end_of_turn_ids(chat, tokenizer)


def test_a_template_that_rewrites_an_answer_is_refused(tokenizer_of):
    template = "Qwen-Qwen3-0.6B.jinja"
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    """Qwen3 cuts the reasoning out of an earlier answer, and renders the last one's after a think block of its own."""
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hm</think>Hello"},
               {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello again"}]
    with pytest.raises(ValueError, match=r"Qwen3-0\.6B\.jinja: it rewrites assistant message 1 \(more than trimming "
                                         r"it\), so it cannot be trained on exactly"):
        render_conversation(chat, tokenizer, earlier)
    with pytest.raises(ValueError, match="its text before the first assistant message depends on that message"):
        render_conversation(chat, tokenizer, earlier[:2])


def test_a_template_that_raises_is_one_error_naming_the_template(tokenizer_of):
    template = "google-gemma-2-2b-it.jinja"
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    with pytest.raises(ValueError, match=r"chat template .*google-gemma-2-2b-it\.jinja: System role not supported"):
        render_conversation(chat, tokenizer, conversations()[1]["messages"])


def test_a_template_that_leaves_out_the_trained_system_message_is_refused(tokenizer_of):
    """Mistral Nemo's template writes the system message into the final user message only: a conversation ending
    with an answer would train without it, and a server would prompt with it."""
    template = "mistralai-Mistral-Nemo-Instruct-2407.jinja"
    tokenizer = tokenizer_of(template)
    chat = load_chat_template(chat_template_path(template), tokenizer)
    messages = conversations()[1]["messages"]
    assert "Answer briefly." not in render(chat, tokenizer, messages)
    with pytest.raises(ValueError, match=r"Nemo-Instruct-2407\.jinja: it leaves out the system message of a "
                                         r"conversation that ends with an answer"):
        render_conversation(chat, tokenizer, messages)


def test_the_tokenizer_template_must_exist(tokenizer_of):
    tokenizer = tokenizer_of("mistral")
    with pytest.raises(ValueError, match="--chat_template tokenizer: the base model's tokenizer has no chat template"):
        load_chat_template("tokenizer", tokenizer)


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "phi-3", "llama-spm"])
def test_the_vocabularies_tokenize_as_llama_cpp_does(name, vocabulary):
    """llama.cpp's own test vectors. Known differences, left to the GGUF export's checks: LLaMA's SentencePiece
    loaded by transformers drops one leading space (its legacy mode), and Llama 3's merges one Vietnamese word
    differently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocabulary(name))
    inputs = (VOCABULARIES / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (VOCABULARIES / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    differing = [text for text, expected in zip(inputs, outputs)
                 if tokenizer(text, add_special_tokens=False)["input_ids"] != [int(t) for t in expected.split()]]
    assert len(inputs) > 40
    if name == "llama-spm":
        assert len(differing) == 15 and all(text.startswith(" ") for text in differing)
    else:
        assert differing == (["Cửa Việt"] if name == "llama-bpe" else [])
