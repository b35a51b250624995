"""Several adapters of one base served together: each request answered through the adapter it names, alone or in a
batch with requests for the others, exactly as that adapter loaded alone answers it."""

import asyncio
import json
import urllib.request

import openai
import pytest
import torch

from alpaca_lora.batcher import Batcher
from alpaca_lora.generate import Generator, Sampling
from alpaca_lora.mixed_adapters import parse_adapters
from alpaca_lora.server import Server

PROMPTS = ("Name three fruits.", "Count to five.", "Say hi.")
GREEDY = Sampling(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def alone(tiny_base, tiny_adapter, second_tiny_adapter):
    """Each adapter loaded on its own, and the bare base: what the mixed server must reproduce."""
    return {"first": Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu"),
            "second": Generator(lora_weights=str(second_tiny_adapter), bf16=False, device="cpu"),
            tiny_base.name: Generator(base_model=str(tiny_base), bf16=False, device="cpu")}


@pytest.fixture(scope="module")
def mixed(tiny_adapter, second_tiny_adapter):
    return Generator(lora_weights=f"first={tiny_adapter},second={second_tiny_adapter}", bf16=False, device="cpu")


def test_lora_weights_names_adapters(tmp_path):
    assert parse_adapters("") == {}
    assert parse_adapters(str(tmp_path / "lora-x")) == {"lora-x": str(tmp_path / "lora-x")}
    assert parse_adapters("a=./x, b=/y") == {"a": "./x", "b": "/y"}
    for bad, says in (("a=./x,./y", "'./y' is not name=folder"), ("a=./x,a=./y", "the name 'a' is given twice"),
                      ("__base__=./x", "is not name=folder")):
        with pytest.raises(ValueError, match=says):
            parse_adapters(bad)


def test_adapters_of_different_prompt_layouts_are_refused(tiny_adapter, tiny_chat_adapter):
    with pytest.raises(ValueError, match=r"chat=.* was trained with the Alpaca template None, alpaca=.* with 'alpaca'"):
        Generator(lora_weights=f"alpaca={tiny_adapter},chat={tiny_chat_adapter}", bf16=False, device="cpu")


def test_an_adapter_named_like_the_base_is_refused(tiny_base, tiny_adapter):
    with pytest.raises(ValueError, match=f"an adapter is named '{tiny_base.name}', the base model's name"):
        Generator(lora_weights=f"{tiny_base.name}={tiny_adapter}", bf16=False, device="cpu")


def test_the_adapters_differ(alone):
    """Otherwise the tests below could not tell one adapter from another."""
    ids = alone["first"].instruction_ids(PROMPTS[0])
    first, second, base = (torch.tensor([score for _, score, _ in g.token_logprobs(ids, 1)]) for g in alone.values())
    assert (first - second).abs().max() > 1e-2 and (first - base).abs().max() > 1e-2


def test_each_name_is_answered_through_its_adapter(mixed, alone):
    assert list(mixed.served) == list(alone)
    ids = mixed.instruction_ids(PROMPTS[0])
    for name, generator in alone.items():
        assert mixed.answer([ids], GREEDY, model_name=name) == generator.answer([ids], GREEDY)
        beams = Sampling(temperature=0, num_beams=2, max_new_tokens=8)
        assert mixed.answer([ids], beams, model_name=name) == generator.answer([ids], beams)
        torch.testing.assert_close(mixed.token_logprobs(ids, 1, top=3, model_name=name),
                                   generator.token_logprobs(ids, 1, top=3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="model 'nope': not served here; use one of first, second"):
        mixed.answer([ids], GREEDY, model_name="nope")


def test_requests_for_different_adapters_share_the_batch(mixed, alone):
    """Nine requests (each prompt for each adapter and the base, the same prompt through different adapters
    included) at once in four slots: every answer is that adapter's own."""
    batcher = Batcher(mixed, max_batch=4)
    batcher.start()
    loop = asyncio.new_event_loop()
    try:
        async def one(prompt, name):
            items = [item async for item in batcher.stream(prompt, GREEDY, model_name=name)]
            return "".join(items[:-1]), items[-1]

        async def all_at_once():
            return await asyncio.gather(*(one(prompt, name) for prompt, name in requests))

        requests = [(mixed.instruction_ids(p), name) for p in PROMPTS for name in alone]
        together = loop.run_until_complete(all_at_once())
        for (prompt, name), (streamed, answer) in zip(requests, together):
            expected = alone[name].answer([prompt], GREEDY)[0]
            assert (answer.text, answer.token_ids, answer.finish_reason) == (
                expected.text, expected.token_ids, expected.finish_reason)
            assert streamed.strip() == expected.text
        assert len({tuple(answer.token_ids) for _, answer in together}) > len(PROMPTS)  # the adapters answer apart
    finally:
        batcher.close()
        loop.close()


def test_the_server_lists_and_serves_every_adapter(mixed, alone):
    running = Server(mixed, "127.0.0.1", 0, max_tokens_cap=64, default_sampling=GREEDY).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key="none", max_retries=0,
                               timeout=120)
        assert [m.id for m in client.models.list()] == list(alone)
        messages = [{"role": "user", "content": PROMPTS[1]}]
        for name, generator in alone.items():
            reply = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=12)
            expected = generator.answer([generator.instruction_ids(PROMPTS[1])], GREEDY)[0]
            assert (reply.model, reply.choices[0].message.content) == (name, expected.text)
            streamed = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=12,
                                                      stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
        with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' is not served here; use one of first"):
            client.chat.completions.create(model="gpt-4", messages=messages, max_tokens=4)
        page = urllib.request.urlopen(f"http://127.0.0.1:{running.port}/").read().decode()
        assert f'const MODELS = {json.dumps(list(alone))};' in page  # the page offers a choice
    finally:
        running.stop()


def test_several_adapters_are_for_the_server_only(tiny_adapter, second_tiny_adapter):
    from alpaca_lora.generate_cli import GenerateConfig, run_generate

    with pytest.raises(ValueError, match="several adapters are served together \\(--serve\\); pass one folder"):
        run_generate(GenerateConfig(lora_weights=f"a={tiny_adapter},b={second_tiny_adapter}", instruction="Hi"))
