"""Conversation rows: the OpenAI and ShareGPT shapes read into one form, checked with the row's number, one shape per
file, and a row the chat template refuses named like any bad row."""

import json

import pytest
from conftest import conversations

from alpaca_lora.chat_template import ChatTemplate
from alpaca_lora.conversations import ALPACA, MESSAGES, SHAREGPT, conversation_of, conversation_problem, row_shape
from alpaca_lora.data import load_rows, rendering_problem, validate_rows

SHAREGPT_ROW = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
                                  {"from": "gpt", "value": "Goodbye."}]}


def test_both_shapes_read_into_the_same_messages():
    assert [row_shape(r) for r in (SHAREGPT_ROW, conversations()[0], {"instruction": "x", "output": "y"}, {})] == \
        [SHAREGPT, MESSAGES, ALPACA, None]
    assert conversation_of(SHAREGPT_ROW) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."}]
    assert conversation_of({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}) == [
        {"role": "user", "content": "Translate.\n\nBonjour"}, {"role": "assistant", "content": "Hello"}]
    assert conversation_of({"instruction": "Name a colour.", "input": "", "output": "Blue"})[0]["content"] == \
        "Name a colour."


@pytest.mark.parametrize("messages, problem", [
    ([], "'messages' must be a non-empty list"),
    ([{"role": "user", "content": "Hi"}], "messages: it ends with a user message; the last message must be the "
                                          "assistant's, to train on"),
    ([{"role": "assistant", "content": "Hi"}], "messages 1: role 'assistant' where 'user' belongs (user and assistant "
                                               "take turns)"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}], "messages 2: role 'user' where "
                                                                             "'assistant' belongs"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Hi"}], "a system message may only come first"),
    ([{"role": "bot", "content": "Hi"}], "messages 1: 'role' 'bot' is not one of system, user, assistant"),
    ([{"role": "user", "content": 3}], "messages 1: 'content' is missing or not a string"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "messages 2: the assistant "
                                                                                  "message is empty"),
    ([{"role": "system", "content": "Be kind."}], "messages: no user message"),
])
def test_each_problem_is_named(messages, problem):
    assert problem in conversation_problem({"messages": messages})


def _file(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def test_bad_rows_are_named_by_line_and_can_be_skipped(tmp_path):
    path = _file(tmp_path, [SHAREGPT_ROW, {"conversations": [{"from": "gpt", "value": "Hi"}]}, SHAREGPT_ROW])
    with pytest.raises(ValueError, match=r"rows\.jsonl: 1 bad row\(s\) of 3: row 2: conversations 1: role 'assistant' "
                                         r"where 'user' belongs \(user and assistant take turns\); fix them or pass "
                                         r"--skip_bad_rows"):
        validate_rows(load_rows(str(path)), skip_bad_rows=False)
    rows, dropped = validate_rows(load_rows(str(path)), skip_bad_rows=True)
    assert dropped == 1 and rows == [{"messages": conversation_of(SHAREGPT_ROW)}] * 2


def test_a_file_mixing_shapes_names_the_first_row_of_each(tmp_path):
    path = _file(tmp_path, [{"instruction": "a", "input": "", "output": "b"}] * 2 + [SHAREGPT_ROW, conversations()[0]])
    with pytest.raises(ValueError, match=r"mixes row shapes \(row 1 is an Alpaca row, row 3 is a ShareGPT "
                                         r"`conversations` row, row 4 is a `messages` conversation\); use one shape"):
        validate_rows(load_rows(str(path)), skip_bad_rows=False)


def test_a_row_the_template_refuses_is_named_with_its_line(tmp_path):
    """A template that raises (here: no system role, as Gemma 2's) makes that row a bad row, named by its line."""
    class Tokenizer:  # what apply_chat_template needs of a tokenizer, nothing more
        def apply_chat_template(self, messages, chat_template, **kwargs):
            if messages[0]["role"] == "system":
                raise RuntimeError("System role not supported")
            return "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)
        added_tokens_decoder, all_special_tokens = {}, ["</s>"]

    path = _file(tmp_path, conversations())
    check = rendering_problem(ChatTemplate("gemma-like", "..."), Tokenizer())
    with pytest.raises(ValueError, match=r"row 2: chat template gemma-like: System role not supported"):
        validate_rows(load_rows(str(path)), skip_bad_rows=False, check=check)
    rows, dropped = validate_rows(load_rows(str(path)), skip_bad_rows=True, check=check)
    assert dropped == 1 and len(rows) == 2
