"""The batcher alone: which requests it takes, and that what it generates is what generate() gives."""

import asyncio

import pytest

from alpaca_lora.batcher import Batcher
from alpaca_lora.generate import Generator, Sampling


@pytest.fixture(scope="module")
def batcher(tiny_adapter):
    generator = Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu")
    running = Batcher(generator, max_batch=4)
    running.start()
    running.loop = asyncio.new_event_loop()  # one loop throughout, as a server has
    yield running
    running.close()
    running.loop.close()


def _collect(batcher, prompts, sampling, stop=()):
    """Every prompt's stream at once (they share the batch): the pieces of each and its Answer."""
    async def one(prompt):
        items = [item async for item in batcher.stream(prompt, sampling, stop)]
        return "".join(items[:-1]), items[-1]

    async def all_at_once():
        return await asyncio.gather(*(one(p) for p in prompts))
    return batcher.loop.run_until_complete(all_at_once())


@pytest.mark.parametrize("sampling, seed, taken", [
    (Sampling(temperature=0), None, True), (Sampling(temperature=0), 7, True),  # a seed changes nothing greedy
    (Sampling(temperature=0.8), None, True), (Sampling(temperature=0.8), 7, False),
    (Sampling(temperature=0, num_beams=2), None, False), (Sampling(temperature=0, repetition_penalty=1.2), None, False),
])
def test_what_the_batch_takes(batcher, sampling, seed, taken):
    assert batcher.takes(sampling, seed) is taken


def test_greedy_answers_in_one_batch_are_each_prompts_answer_alone(batcher):
    generator = batcher.generator
    prompts = [generator.instruction_ids(i) for i in ("Name three fruits.", "Count to five.", "Say hi.",
                                                       "Describe the sea in one sentence.", "Give two colours.")]
    sampling = Sampling(temperature=0, max_new_tokens=12)
    alone = [generator.answer([p], sampling)[0] for p in prompts]
    together = _collect(batcher, prompts, sampling)  # five prompts, four slots: one waits, then joins
    for (streamed, answer), expected in zip(together, alone):
        assert answer.text == expected.text and streamed.strip() == expected.text
        assert (answer.completion_tokens, answer.finish_reason) == (expected.completion_tokens, expected.finish_reason)
        assert answer.prompt_tokens == expected.prompt_tokens


def test_a_stop_string_ends_the_answer_where_generate_cuts_it(batcher):
    generator = batcher.generator
    prompt = generator.instruction_ids("Name three fruits.")
    whole = generator.answer([prompt], Sampling(temperature=0, max_new_tokens=16))[0].text
    stop = whole[2:4]
    expected = generator.answer([prompt], Sampling(temperature=0, max_new_tokens=16), stop=(stop,))[0]
    [(streamed, answer)] = _collect(batcher, [prompt], Sampling(temperature=0, max_new_tokens=16), (stop,))
    assert answer.text == expected.text == whole[:whole.index(stop)].strip() and answer.finish_reason == "stop"
    assert streamed.strip() == answer.text


def test_sampled_requests_keep_their_own_settings(batcher):
    """top_k 1 samples the argmax whatever the temperature; top_k 0 (all tokens) is allowed."""
    generator = batcher.generator
    prompt = generator.instruction_ids("Name three fruits.")
    greedy = generator.answer([prompt], Sampling(temperature=0, max_new_tokens=10))[0].text
    [(_, top_1)] = _collect(batcher, [prompt], Sampling(temperature=1.5, top_k=1, top_p=1.0, max_new_tokens=10))
    [(_, everything)] = _collect(batcher, [prompt], Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10))
    assert top_1.text == greedy and everything.completion_tokens >= 1


def test_a_stopped_generation_thread_is_an_error_not_a_wait(tiny_adapter):
    generator = Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu")
    stopped = Batcher(generator, max_batch=2)  # never started
    with pytest.raises(RuntimeError, match="the batch's generation thread has stopped"):
        _collect(type("Running", (), {"stream": stopped.stream, "loop": asyncio.new_event_loop()})(),
                 [generator.instruction_ids("Say hi.")], Sampling(temperature=0, max_new_tokens=4))


def test_a_4bit_base_is_batched_too(tiny_adapter):
    """bitsandbytes' 4-bit layers (CPU here) step in the batch like any other: the same greedy answer as alone."""
    generator = Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu", load_4bit=True)
    quantized = Batcher(generator, max_batch=2)
    quantized.start()
    quantized.loop = asyncio.new_event_loop()
    try:
        prompt = generator.instruction_ids("Say hi.")
        sampling = Sampling(temperature=0, max_new_tokens=8)
        [(_, answer)] = _collect(quantized, [prompt], sampling)
        assert answer == generator.answer([prompt], sampling)[0]
    finally:
        quantized.close()
        quantized.loop.close()
