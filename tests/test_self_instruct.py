"""self_instruct.py against a fake OpenAI-compatible server on 127.0.0.1 (conftest.FakeAPI)."""

import json

import pytest
from conftest import REPO, ok, run_script

from alpaca_lora.self_instruct import SelfInstructConfig, build_prompt, clean_rows, parse_tasks, regenerate, rejection

WELL_FORMED = """ Summarize the story of a novel you like in three sentences.
4. Input:
<noinput>
4. Output:
A young wizard learns he is famous, goes to a school of magic, and stops a dark wizard from returning.
###
5. Instruction: Convert the temperature from Celsius to Fahrenheit.
5. Input:
25 degrees Celsius
5. Output:
77 degrees Fahrenheit.
###
6. Instruction: Draw a picture of a cat sitting on a fence.
6. Input:
<noinput>
6. Output:
(A cat on a fence.)
###
7. Instruction: Suggest a name for a bakery that sells only sourdough bread.
7. Input:
No input
7. Output:
The Rising Crust.
###"""

MARKDOWN = """ **Explain why leaves change colour in autumn for a child.**
**4. Input:** N/A
**4. Output:** Trees stop making green chlorophyll, so the yellow and orange colours hiding underneath show through.
##
**5. Instruction:** Rewrite the sentence so it sounds more polite and friendly.
**5. Input:** Give me the salt.
**5. Output:** Could you please pass me the salt?"""

TRUNCATED = """ List three uses for baking soda around the house.
4. Input:
<noinput>
4. Output:
Cleaning ovens, deodorising fridges, and softening water.
###
5. Instruction: Describe how a rainbow forms after a storm in detail.
5. Input:
<noinput>
5. Output:
Sunlight enters raindrops and"""


def config(tmp_path, api, **overrides):
    settings = dict(output_dir=str(tmp_path / "regen"), num_instructions=5, model="gpt-4o-mini", base_url=api.url,
                    request_batch_size=2, seed=0, request_timeout=2.0, max_retries=3)
    return SelfInstructConfig(**{**settings, **overrides})


def kept(tmp_path):
    return [json.loads(line) for line in (tmp_path / "regen" / "regen.jsonl").read_text().splitlines()]


def test_prompt_shows_numbered_seeds_and_continues_the_numbering():
    seeds = [{"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
             {"instruction": "Say hello.", "input": "", "output": "Hello!"}]
    prompt = build_prompt(seeds)
    assert "1. Instruction: Add the numbers.\n1. Input:\n2, 3\n1. Output:\n5\n###" in prompt
    assert "2. Input:\n<noinput>\n" in prompt and prompt.endswith("3. Instruction:")


def test_parser_takes_the_format_and_its_usual_variations():
    tasks, rejected = parse_tasks(WELL_FORMED, 4)
    assert [t["instruction"][:20] for t in tasks] == ["Summarize the story ", "Convert the temperat",
                                                      "Draw a picture of a ", "Suggest a name for a"]
    assert tasks[1] == {"instruction": "Convert the temperature from Celsius to Fahrenheit.",
                        "input": "25 degrees Celsius", "output": "77 degrees Fahrenheit."}
    assert tasks[0]["input"] == tasks[3]["input"] == "" and rejected == {}
    markdown, _ = parse_tasks(MARKDOWN, 4)
    assert markdown == [
        {"instruction": "Explain why leaves change colour in autumn for a child.", "input": "",
         "output": "Trees stop making green chlorophyll, so the yellow and orange colours hiding underneath show through."},
        {"instruction": "Rewrite the sentence so it sounds more polite and friendly.", "input": "Give me the salt.",
         "output": "Could you please pass me the salt?"}]
    garbage, rejected = parse_tasks(" I'm sorry, I can't help with that.\n5. Instruction: half a task", 4)
    assert garbage == [] and rejected == {"no output": 2}


@pytest.mark.parametrize("instruction, reason", [
    ("Say hi.", "length"), ("word " * 151, "length"), ("Draw a map of your town for a visitor.", "blacklisted word"),
    ("Write a program that sorts a list of numbers.", "write a program"),
    ("\"Quote\" the following sentence back to me please.", "starts with punctuation"),
    ("Écris une phrase en français sur la mer.", "starts with non-ASCII"),
    ("Profile the typical customer of a bakery.", None)])
def test_stanford_filters(instruction, reason):
    assert rejection({"instruction": instruction, "input": "", "output": "x"}) == reason


def test_a_run_keeps_filtered_rows_and_writes_its_summary(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-test-key")
    # batch 1: an answer and the same answer again; batch 2: markdown and an answer cut off by max_tokens
    api = fake_api([ok(WELL_FORMED), ok(WELL_FORMED), ok(MARKDOWN), ok((TRUNCATED, "length")), ok(" no tasks")])
    export = tmp_path / "alpaca.json"
    summary = regenerate(config(tmp_path, api, export=str(export), num_instructions=6), write=lambda *a: None)
    rows = kept(tmp_path)
    assert len(rows) == 6 and summary["kept"] == 6 and summary["stopped"] == "target reached"
    assert summary["rejected"]["ROUGE-L > 0.7"] == 3, summary["rejected"]
    assert "Draw a picture of a cat sitting on a fence." not in [r["instruction"] for r in rows]
    assert summary["rejected"]["blacklisted word"] >= 1 and summary["rejected"]["cut off by max_tokens"] == 1
    assert summary["spend"]["input_tokens"] == 1000 * summary["spend"]["requests"]
    assert summary["spend"]["usd"] == pytest.approx(summary["spend"]["requests"] * (0.15 + 0.3) / 1000)
    assert json.loads(export.read_text()) == rows
    assert api.calls[0]["authorization"] == "Bearer sk-secret-test-key"
    for path in (tmp_path / "regen").iterdir():
        assert "sk-secret-test-key" not in path.read_text()


def test_the_same_seed_asks_the_same_prompts(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    first = fake_api([ok(WELL_FORMED)])
    regenerate(config(tmp_path / "a", first, num_instructions=2), write=lambda *a: None)
    second = fake_api([ok(WELL_FORMED)])
    regenerate(config(tmp_path / "b", second, num_instructions=2), write=lambda *a: None)
    prompts = lambda api: sorted(c["body"]["messages"][0]["content"] for c in api.calls)
    assert prompts(first) == prompts(second)
    third = fake_api([ok(WELL_FORMED)])
    regenerate(config(tmp_path / "c", third, num_instructions=2, seed=1), write=lambda *a: None)
    assert prompts(third) != prompts(first)


def test_rate_limits_and_server_errors_are_retried(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = fake_api([(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"}, 0),
                    (500, {"error": {"message": "oops"}}, {}, 0), (200, WELL_FORMED, {}, 3.0), ok(WELL_FORMED)])
    summary = regenerate(config(tmp_path, api, num_instructions=3, request_batch_size=1), write=lambda *a: None)
    assert summary["kept"] == 3
    assert summary["retries"] == {"RateLimitError": 1, "InternalServerError": 1, "APITimeoutError": 1}


@pytest.mark.parametrize("status, message", [(401, "API key was refused"), (404, "not found"),
                                             (403, "permission denied")])
def test_fatal_errors_stop_at_once_with_one_line(fake_api, tmp_path, monkeypatch, status, message):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-test-key")
    api = fake_api([(status, {"error": {"message": "no"}}, {}, 0)])
    with pytest.raises(ValueError, match=message) as error:
        regenerate(config(tmp_path, api, request_batch_size=1), write=lambda *a: None)
    assert "sk-secret" not in str(error.value) and len(api.calls) == 1


def test_a_missing_key_is_one_line_from_the_command_line(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    result = run_script(REPO / "self_instruct.py", "--output_dir", tmp_path / "r", "--base_url", "http://127.0.0.1:9/v1",
                        env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "self_instruct.py: error: no API key: set OPENAI_API_KEY " \
                                                     "(any value for a local server that ignores it)"


def test_resume_after_a_kill_mid_batch(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    regenerate(config(tmp_path, fake_api([ok(WELL_FORMED), ok(MARKDOWN)]), num_instructions=3), write=lambda *a: None)
    path = tmp_path / "regen" / "regen.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:25])  # killed while writing the second row
    summary = regenerate(config(tmp_path, fake_api([ok(WELL_FORMED), ok(MARKDOWN), ok(TRUNCATED)]), num_instructions=5),
                         write=lambda *a: None)
    rows = kept(tmp_path)
    assert summary["kept"] == len(rows) == 5
    assert len({r["instruction"] for r in rows}) == 5 and rows[0] == json.loads(lines[0])


def test_the_cost_limit_stops_cleanly(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = fake_api([ok(" Nothing useful.")])  # every request costs, none keeps a row
    summary = regenerate(config(tmp_path, api, max_cost_usd=0.002, request_batch_size=1), write=lambda *a: None)
    assert summary["stopped"] == "cost limit" and summary["spend"]["usd"] >= 0.002
    assert summary["spend"]["requests"] == 5  # 0.00045 USD a request
    assert json.loads((tmp_path / "regen" / "summary.json").read_text())["stopped"] == "cost limit"
    with pytest.raises(ValueError, match=r"--max_cost_usd 1: no price is known for model 'my-local-model'"):
        regenerate(config(tmp_path, api, model="my-local-model", max_cost_usd=1), write=lambda *a: None)


def test_cleaning_rules_on_crafted_rows():
    rows = [
        {"instruction": "Name a fruit.", "input": "<noinput>", "output": "Apple."},
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."},  # a duplicate once normalised
        {"instruction": "Summarise it.", "input": "No input", "output": "N/A"},
        {"instruction": "Describe the photo.", "input": "https://example.com/cat.jpg", "output": "A cat."},
        {"instruction": "What is shown?", "input": "<image>", "output": "A dog."},
        {"instruction": "Say\x07 hi.", "input": "", "output": "Hi!\x00"},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5\n##\n18. Instruction: Subtract 3 from 5.\n"
                                                                "18. Input:\n<noinput>\n18. Output:\n2"},
        {"instruction": "Give an empty answer.", "input": "", "output": "   "},
    ]
    cleaned, counts = clean_rows(rows)
    assert cleaned == [{"instruction": "Name a fruit.", "input": "", "output": "Apple."},
                       {"instruction": "Say hi.", "input": "", "output": "Hi!"},
                       {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                       {"instruction": "Subtract 3 from 5.", "input": "", "output": "2"}]
    assert counts == {"no-input marker normalised": 2, "empty or N/A output dropped": 2, "merged second task split": 1,
                      "URL or attachment input dropped": 2, "control characters stripped": 2,
                      "exact duplicate dropped": 1}


def test_clean_from_the_command_line(tmp_path):
    source = tmp_path / "in.json"
    source.write_text(json.dumps([{"instruction": "Name a fruit.", "input": "N/A", "output": "Apple."}] * 2))
    result = run_script(REPO / "self_instruct.py", "clean", source, tmp_path / "out.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text()) == [{"instruction": "Name a fruit.", "input": "",
                                                                 "output": "Apple."}]
    assert "2 rows in, 1 out" in result.stdout


def test_a_server_that_never_gives_usable_tasks_stops_the_run(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    summary = regenerate(config(tmp_path, fake_api([ok(" I cannot do that.")]), model="local", request_batch_size=1),
                         write=lambda *a: None)
    assert summary["stopped"] == "20 batches in a row kept nothing" and summary["kept"] == 0


def test_a_dead_api_stops_the_run_with_one_line_and_no_export(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = fake_api([(500, {"error": {"message": "down"}}, {}, 0)])
    export = tmp_path / "rows.json"
    with pytest.raises(ValueError, match=r"every request of a batch failed after 1 retries each \(InternalServerError: "
                                         r".*down.*\): the API at http://127.0.0.1:\d+/v1 is not answering"):
        regenerate(config(tmp_path, api, max_retries=1, export=str(export)), write=lambda *a: None)
    assert len(api.calls) == 2 * 2 and not export.exists()  # 2 requests, each tried twice, then no more


def test_nothing_listening_is_a_non_zero_exit_from_the_command_line(tmp_path):
    import os

    result = run_script(REPO / "self_instruct.py", "--output_dir", tmp_path / "r", "--base_url",
                        "http://127.0.0.1:9/v1", "--max_retries", "1", "--request_batch_size", "2",
                        "--export", tmp_path / "rows.json", env={**os.environ, "OPENAI_API_KEY": "k"}, timeout=120)
    assert result.returncode == 1 and not (tmp_path / "rows.json").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(
        "self_instruct.py: error: every request of a batch failed after 1 retries each (APIConnectionError")


def test_one_request_s_retries_are_capped_in_time(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    api = fake_api([(200, WELL_FORMED, {}, 3.0)])  # every answer comes after the 2 s timeout
    with pytest.raises(ValueError, match=r"\(RetriesExhausted: no answer in 1 s of attempts\)"):
        regenerate(config(tmp_path, api, request_batch_size=1, max_retries=5, max_retry_seconds=1.0),
                   write=lambda *a: None)
    assert len(api.calls) == 1  # the first attempt was still waiting when the cap ran out


def test_an_error_that_echoes_the_key_is_shown_without_it(fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-test-key-123")
    api = fake_api([(400, {"error": {"message": "bad request; headers were Authorization: Bearer "
                                                "sk-secret-test-key-123"}}, {}, 0)])
    with pytest.raises(ValueError, match=r"the API refused the request \(400\)") as error:
        regenerate(config(tmp_path, api, request_batch_size=1), write=lambda *a: None)
    assert "secret" not in str(error.value) and "[redacted]" in str(error.value)
