import json

import pytest

from alpaca_lora.templates import available_templates, load_template


def test_the_three_templates_ship_with_the_project():
    assert {"alpaca", "alpaca_legacy", "alpaca_short"} <= set(available_templates())


def test_alpaca_prompt_with_and_without_input():
    template = load_template("alpaca")
    with_input = template.prompt("Translate.", "Bonjour")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    for empty in ("", "   ", None):
        assert template.prompt("Say hi.", empty).endswith("### Instruction:\nSay hi.\n\n### Response:\n")
        assert "### Input:" not in template.prompt("Say hi.", empty)


def test_braces_in_rows_are_kept_literally():
    assert "{name}" in load_template("alpaca").prompt("Fill {name} in.", "{input}")


def test_response_is_cut_at_the_marker():
    template = load_template("alpaca")
    assert template.response(template.prompt("Say hi.") + " Hello there. ") == "Hello there."


def test_unknown_template_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"--prompt_template_name 'nope'.*alpaca, alpaca_legacy, alpaca_short"):
        load_template("nope")


def test_template_from_a_json_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"description": "d", "prompt_input": "Q: {instruction} ({input})\nA:",
                                "prompt_no_input": "Q: {instruction}\nA:", "response_split": "A:"}))
    assert load_template(str(path)).prompt("x", "y") == "Q: x (y)\nA:"


def test_bad_template_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"description": "d",')
    with pytest.raises(ValueError, match="broken.json: malformed JSON at line 1"):
        load_template(str(broken))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"description": "d", "prompt_input": "{instruction} {input}"}))
    with pytest.raises(ValueError, match="prompt_no_input, response_split"):
        load_template(str(missing))
