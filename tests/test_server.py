"""The OpenAI client against the server on loopback."""

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from alpaca_lora.generate import Generator, Sampling
from alpaca_lora.server import Server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def generator(tiny_adapter):
    return Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu")


@pytest.fixture(scope="module")
def server(generator):
    running = Server(generator, "127.0.0.1", 0, api_key=KEY, max_tokens_cap=64,
                     default_sampling=Sampling(temperature=0.0, max_new_tokens=16)).start()
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client, generator):
    assert [m.id for m in client.models.list()] == [generator.name]


def test_chat_is_the_templated_instruction(client, generator):
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Name a colour."}],
                                           temperature=0, max_tokens=12)
    expected = generator.answer([generator.instruction_ids("Name a colour.")], Sampling(temperature=0, max_new_tokens=12))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.prompt_tokens == len(generator.instruction_ids("Name a colour."))
    with_input = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Translate."}],
                                                temperature=0, max_tokens=12, extra_body={"input": "Bonjour"})
    assert with_input.choices[0].message.content == generator.answer(
        [generator.instruction_ids("Translate.", "Bonjour")], Sampling(temperature=0, max_new_tokens=12))[0].text


def test_completion_is_the_raw_prompt(client, generator):
    reply = client.completions.create(model="x", prompt="Once upon a time", temperature=0, max_tokens=10)
    assert reply.choices[0].text == generator.answer([generator.text_ids("Once upon a time")], Sampling(temperature=0, max_new_tokens=10))[0].text


def test_streaming_gives_the_same_text(client):
    messages = [{"role": "user", "content": "Tell me something."}]
    whole = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text_chunks = list(client.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8, stream=True))
    streamed = "".join(c.choices[0].text for c in text_chunks).strip()
    assert streamed == client.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8).choices[0].text


def test_a_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server + "/v1", api_key=key or "none", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert error.value.status_code == 401 and "API key" in error.value.body["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}, "n"),
    ({"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "num_beams": 2}, "num_beams"),
])
def test_bad_requests_get_openai_style_400s_and_the_server_goes_on(client, body, param):
    with pytest.raises(openai.BadRequestError) as error:
        extra = {k: body[k] for k in ("num_beams",) if k in body}  # our extensions travel in extra_body
        client.chat.completions.create(model="x", **{k: v for k, v in body.items() if k not in extra}, extra_body=extra)
    assert error.value.status_code == 400
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["param"] == param
    assert client.chat.completions.create(model="x", messages=[{"role": "user", "content": "ok"}], max_tokens=4)


def test_malformed_json_and_unknown_paths(server):
    def post(path, data):
        request = urllib.request.Request(server + path, data=data, method="POST",
                                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request)
        return error.value.code, json.loads(error.value.read())
    status, body = post("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and body["error"]["message"].startswith("malformed JSON body")
    status, body = post("/v1/embeddings", b"{}")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    # unknown fields are ignored
    request = urllib.request.Request(server + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "Hi", "max_tokens": 3, "logit_bias": {}, "user": "u"}).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(request).read())["object"] == "text_completion"


def test_the_page_is_served_without_a_key(server):
    page = urllib.request.urlopen(server + "/").read().decode()
    assert "<title>alpaca-lora</title>" in page and "/v1/chat/completions" in page
    assert "const CHAT = false;" in page  # an Alpaca adapter: the page says each message is answered on its own


@pytest.fixture(scope="module")
def chat_generator(tiny_chat_adapter):
    return Generator(lora_weights=str(tiny_chat_adapter), bf16=False, device="cpu")


@pytest.fixture(scope="module")
def chat_server(chat_generator):
    running = Server(chat_generator, "127.0.0.1", 0, max_tokens_cap=64,
                     default_sampling=Sampling(temperature=0.0, max_new_tokens=16)).start()
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And another?"}]


def test_chat_takes_the_whole_conversation_as_training_rendered_it(chat_server, chat_generator):
    client = openai.OpenAI(base_url=chat_server + "/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="x", messages=CONVERSATION, temperature=0, max_tokens=12)
    prompt = chat_generator.conversation_ids(CONVERSATION)
    expected = chat_generator.answer([prompt], Sampling(temperature=0, max_new_tokens=12))[0]
    assert reply.choices[0].message.content == expected.text and reply.usage.prompt_tokens == len(prompt)
    text = chat_generator.tokenizer.decode(prompt)
    assert text.startswith("<s>[INST] Answer briefly.\n\nName a colour. [/INST]Blue.</s>")  # system and history
    assert text.endswith("[INST] And another? [/INST]")
    assert chat_generator.stop_ids == [chat_generator.tokenizer.eos_token_id]  # mistral's end of turn is </s>


@pytest.mark.parametrize("messages, message", [
    (CONVERSATION[:3], "the last message must be a user message"),
    ([CONVERSATION[1], CONVERSATION[1]], "Conversation roles must alternate"),
    ([{"role": "tool", "content": "42"}, CONVERSATION[1]], "tool messages are not supported"),
])
def test_a_conversation_the_template_refuses_is_a_400(chat_server, messages, message):
    client = openai.OpenAI(base_url=chat_server + "/v1", api_key="none", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="x", messages=messages, max_tokens=4)


def test_the_page_is_a_multi_turn_chat_in_headless_chromium(chat_server, chat_generator, tmp_path):
    """Set a system message, send two messages, see each streamed answer; start over (Debian's chromium)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        browser.get(chat_server + "/")
        browser.find_element(By.TAG_NAME, "summary").click()  # the sampling settings
        for field, value in (("temperature", "0"), ("max_tokens", "12")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "system").send_keys("Answer briefly.")
        for turn, text in enumerate(("Name a colour.", "And another?"), start=1):
            browser.find_element(By.ID, "message").send_keys(text)
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 120).until(
                lambda b: b.find_element(By.ID, "conversation").get_attribute("data-turns") == str(turn))
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#conversation .message")]
        assert browser.find_element(By.ID, "status").text == ""
        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, "#conversation .message") == []
    finally:
        browser.quit()
    greedy = Sampling(temperature=0, max_new_tokens=12)
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    first = chat_generator.answer([chat_generator.conversation_ids(conversation)], greedy)[0].text
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "And another?"}]
    second = chat_generator.answer([chat_generator.conversation_ids(conversation)], greedy)[0].text
    assert shown == ["Name a colour.", first, "And another?", second] and first


# ---- probes: what a hostile or unlucky client sends (issue: 43 of 175 fault and attack probes) ----

def _address(server):
    host, port = server.rsplit("//", 1)[1].split(":")
    return host, int(port)


def _raw(server, data: bytes, wait: float = 3.0) -> bytes:
    """Send bytes as they are; everything the server answers until it closes or `wait` s pass in silence."""
    import socket

    with socket.create_connection(_address(server), timeout=wait) as connection:
        connection.sendall(data)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def _post(path: str, body: bytes, key: str = KEY, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_a_body_length_that_is_negative_or_too_large_is_refused_unread(server):
    for length in ("-1", "abc"):
        reply = _raw(server, f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
                             f"Content-Type: application/json\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
    reply = _raw(server, f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {10 ** 9}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 413") and b"request body over 1048576 bytes" in reply


def test_a_refused_request_s_body_is_never_read_as_the_next_request(server):
    smuggled = f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    reply = _raw(server, _post("/v1/chat/completions", smuggled, key="wrong"))
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 401"), reply
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               + f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n")
    reply = _raw(server, chunked)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 401"), reply


def test_a_page_elsewhere_cannot_drive_a_local_server(server):
    host, port = _address(server)
    rebound = _raw(server, f"GET /v1/models HTTP/1.1\r\nHost: evil.example:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                           f"\r\n".encode())
    assert rebound.startswith(b"HTTP/1.1 400") and b"is not this server's name" in rebound
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    form = _raw(server, _post("/v1/completions", body).replace(b"application/json", b"text/plain"))
    assert form.startswith(b"HTTP/1.1 415") and b"send application/json" in form


def test_binding_beyond_loopback_without_a_key_is_warned_about(tiny_adapter, monkeypatch):
    from alpaca_lora import generate_cli

    monkeypatch.setattr(generate_cli.Server, "serve", lambda self: self.socket.close())
    said = []
    generate_cli.run_generate(generate_cli.GenerateConfig(lora_weights=str(tiny_adapter), serve=True,
                                                          server_name="0.0.0.0", port=0, bf16=False), write=said.append)
    assert said[0].startswith("warning: serving on 0.0.0.0 without --api_key")


@pytest.fixture
def slow_generator(generator, monkeypatch):
    """Answers that take until the request's stop event is set (or 10 s), recording each event."""
    from alpaca_lora.generate import Answer

    events = []

    def answer(prompts, sampling, seed=None, streamer=None, stop_event=None, stop=(), model_name=None):
        events.append(stop_event)
        stop_event.wait(10)
        return [Answer("late", 1, 1, "stop")]
    monkeypatch.setattr(generator, "answer", answer)
    return events


def test_an_abandoned_request_stops_generating(server, slow_generator, capfd):
    """One answered alone (beam search is not batched): its stop event is set."""
    import time

    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "num_beams": 2}).encode()
    _raw(server, _post("/v1/chat/completions", body), wait=0.5)  # sends, waits half a second, hangs up
    deadline = time.time() + 5
    while not (slow_generator and slow_generator[0].is_set()) and time.time() < deadline:
        time.sleep(0.05)
    assert slow_generator and slow_generator[0].is_set()  # the server told generation to stop
    assert "Traceback" not in capfd.readouterr().err


def test_the_queue_is_bounded(generator, slow_generator):
    """--max_batch 1 (one at a time) and --max_queue 1: a third request in hand gets 429 with Retry-After."""
    import socket
    import time

    bounded = Server(generator, "127.0.0.1", 0, api_key=KEY, max_batch=1, max_queue=1).start()
    address = f"http://127.0.0.1:{bounded.port}"
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
        waiting = [socket.create_connection(_address(address)) for _ in range(2)]
        for connection in waiting:
            connection.sendall(_post("/v1/chat/completions", body))
        while len(slow_generator) < 1:
            time.sleep(0.05)
        time.sleep(0.3)
        third = _raw(address, _post("/v1/chat/completions", body), wait=2)
        assert third.startswith(b"HTTP/1.1 429") and b"the server is busy" in third
        assert b"retry-after: 5" in third.lower() and b"rate_limit_error" in third
        for connection in waiting:
            connection.close()
    finally:
        bounded.stop()


def test_concurrent_greedy_answers_equal_each_prompt_alone(generator, server, client):
    """Eight clients at once, streamed and not, different prompts and lengths: each greedy answer (fp32) is what
    the same prompt gets from generate() alone."""
    prompts = ["Name three fruits.", "Describe the sea in one sentence.", "Count to five.", "Say hi.",
               "Give two colours.", "What is rain?", "Name a planet.", "List three verbs."]
    lengths = [16, 9, 16, 5, 12, 16, 7, 16]
    alone = [generator.answer([generator.instruction_ids(p)], Sampling(temperature=0, max_new_tokens=n))[0].text
             for p, n in zip(prompts, lengths)]
    results = [None] * len(prompts)

    def ask(i):
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            results[i] = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                                        max_tokens=lengths[i]).choices[0].message.content
        else:
            chunks = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                                    max_tokens=lengths[i], stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client, monkeypatch):
    """A batched request whose client hangs up is cancelled in the batch (its slot is free at the next step)."""
    import socket
    import time

    from alpaca_lora import batcher as batcher_module

    cancelled = []
    real_cancel = batcher_module.Batcher.stream

    async def spying_stream(self, prompt, sampling, stop=(), model_name=None):
        manager_cancel = self.manager.cancel_request
        self.manager.cancel_request = lambda request_id: (cancelled.append(request_id), manager_cancel(request_id))
        try:
            async for item in real_cancel(self, prompt, sampling, stop, model_name):
                yield item
        finally:
            self.manager.cancel_request = manager_cancel
    monkeypatch.setattr(batcher_module.Batcher, "stream", spying_stream)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "temperature": 0,
                       "stream": True}).encode()
    with socket.create_connection(_address(server)) as connection:  # hangs up after the first event
        connection.sendall(_post("/v1/chat/completions", body))
        received = b""
        while b"data:" not in received:
            chunk = connection.recv(4096)
            assert chunk, f"the server closed the connection before any event: {received!r}"
            received += chunk
    deadline = time.time() + 10
    while not cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert len(cancelled) == 1
    # the server goes on answering
    assert client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi."}],
                                          temperature=0, max_tokens=4).choices[0].message.content


def test_a_half_sent_request_is_closed(server, monkeypatch):
    import socket
    import time

    started = time.time()
    with socket.create_connection(_address(server), timeout=30) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing more
        assert connection.recv(1024) == b""  # the server hung up
    assert time.time() - started < 20  # HEADER_SECONDS, not forever


def test_a_body_that_never_comes_gets_408(server, monkeypatch):
    from alpaca_lora import openai_schema

    monkeypatch.setattr(openai_schema, "BODY_SECONDS", 1)
    reply = _raw(server, _post("/v1/completions", b"")[:-4].replace(b"Content-Length: 0", b"Content-Length: 50")
                 + b"\r\n\r\n{", wait=4)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


@pytest.mark.parametrize("batched", [True, False])
def test_an_error_mid_stream_is_an_error_event_then_done(server, generator, monkeypatch, batched):
    from alpaca_lora.batcher import Batcher

    def failing_stream(prompt, sampling, seed=None, stop_event=None, stop=(), model_name=None):
        yield "Once"
        raise RuntimeError("the GPU fell over")

    async def failing_batched_stream(self, prompt, sampling, stop=(), model_name=None):
        yield "Once"
        raise RuntimeError("the GPU fell over")
    monkeypatch.setattr(generator, "stream", failing_stream)
    monkeypatch.setattr(Batcher, "stream", failing_batched_stream)
    # a greedy request joins the batch; a repetition penalty is answered alone
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0,
                       "repetition_penalty": 1.0 if batched else 1.2}).encode()
    reply = _raw(server, _post("/v1/chat/completions", body)).decode()
    events = [line[6:] for line in reply.split("\r\n\r\n", 1)[1].splitlines() if line.startswith("data: ")]
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Once"
    assert json.loads(events[-2])["error"]["message"] == "the GPU fell over" and events[-1] == "[DONE]"
    assert reply.count("HTTP/1.1 ") == 1


@pytest.mark.parametrize("body, message", [
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "a lone surrogate"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_text_that_is_no_text_and_json_too_deep_are_400s(server, body, message):
    reply = _raw(server, _post("/v1/completions", body))
    assert reply.startswith(b"HTTP/1.1 400") and message.encode() in reply


def test_openai_s_parameters_mean_what_they_mean_there(client, generator):
    messages = [{"role": "user", "content": "Name a colour."}]
    assert client.chat.completions.create(model="x", messages=messages, temperature=2, max_tokens=4)  # an int
    whole = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16)
    text = whole.choices[0].message.content
    stop = text.split()[1] if len(text.split()) > 1 else text[1:3]
    cut = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)].strip() and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed).strip() == cut.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="x", messages=messages, extra_body={"n": True})
    assert error.value.body["param"] == "n"


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.1}], ids=["batched", "alone"])
def test_n_answers_in_one_request(client, generator, extra):
    """n sampled answers (sharing the batch, or as rows of one generate call): n choices, the prompt counted once;
    greedy, n copies of the one answer."""
    messages = [{"role": "user", "content": "Name three fruits."}]
    sampled = client.chat.completions.create(model="x", messages=messages, temperature=1.0, max_tokens=8, n=3,
                                             extra_body=extra)
    assert [c.index for c in sampled.choices] == [0, 1, 2] and all(c.message.content for c in sampled.choices)
    prompt_tokens = len(generator.conversation_ids(messages))
    assert sampled.usage.prompt_tokens == prompt_tokens
    assert sampled.usage.completion_tokens <= 3 * 8
    greedy = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=8, n=2,
                                            extra_body=extra)
    alone = generator.answer([generator.conversation_ids(messages)], Sampling(temperature=0, max_new_tokens=8,
                                                                              **extra))[0].text
    assert [c.message.content for c in greedy.choices] == [alone, alone]


def test_a_stream_can_end_with_its_usage(client):
    """stream_options.include_usage: a last chunk with no choices carries the counts the whole answer reports."""
    messages = [{"role": "user", "content": "Name three fruits."}]
    whole = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def _direct_log_probs(generator, ids: list[int]):
    """log p(ids[i] | ids[:i]) for i >= 1, and the log-softmax rows, straight from the model (fp32)."""
    import torch

    with torch.no_grad():
        logits = generator.model(input_ids=torch.tensor([ids])).logits[0].float()
    rows = logits[:-1].log_softmax(-1)
    return rows.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))[:, 0].tolist(), rows


def test_chat_logprobs_are_the_models_own(client, generator):
    messages = [{"role": "user", "content": "Name three fruits."}]
    reply = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=10, logprobs=True,
                                           top_logprobs=3)
    prompt = generator.conversation_ids(messages)
    answer = generator.answer([prompt], Sampling(temperature=0, max_new_tokens=10))[0]
    expected, rows = _direct_log_probs(generator, prompt + answer.token_ids)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(answer.token_ids) >= 1
    for i, item in enumerate(content):
        assert item.logprob == pytest.approx(expected[len(prompt) - 1 + i], abs=1e-4)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(
            rows[len(prompt) - 1 + i].topk(3).values.tolist(), abs=1e-4)
    assert "".join(item.token for item in content).strip() == reply.choices[0].message.content


def test_a_prompt_is_scored_with_echo_and_no_new_tokens(client, generator):
    """What lm-evaluation-harness's local-completions asks: the prompt's token log-probabilities, nothing generated."""
    text = "The capital of France is Paris."
    reply = client.completions.create(model="x", prompt=text, max_tokens=0, echo=True, logprobs=1)
    ids = generator.text_ids(text)
    expected, _ = _direct_log_probs(generator, ids)
    logprobs = reply.choices[0].logprobs
    assert reply.choices[0].text == text and reply.usage.completion_tokens == 0
    assert logprobs.token_logprobs[0] is None and logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(logprobs.tokens) == text and logprobs.text_offset[-1] == len(text) - len(logprobs.tokens[-1])
    # and with tokens generated after it, the prompt's part is the same
    more = client.completions.create(model="x", prompt=text, max_tokens=2, temperature=0, echo=True, logprobs=1)
    assert more.choices[0].logprobs.token_logprobs[:len(ids)] == pytest.approx(logprobs.token_logprobs, abs=1e-6)
    assert len(more.choices[0].logprobs.tokens) == len(ids) + 2


def test_prompts_as_token_ids_and_several_at_once(client, generator):
    """Token ids are used as they are (no BOS put in front); several prompts get n answers each, prompt by prompt."""
    sampling = Sampling(temperature=0, max_new_tokens=6)
    ids = generator.text_ids("Once upon a time")[1:]  # without its BOS: as a tool may send them
    reply = client.completions.create(model="x", prompt=ids, temperature=0, max_tokens=6, echo=True)
    expected = generator.answer([ids], sampling)[0]
    assert reply.choices[0].text == generator.tokenizer.decode(ids) + expected.text
    assert reply.usage.prompt_tokens == len(ids)
    texts = ["Once upon a time", "The sea is"]
    both = client.completions.create(model="x", prompt=texts, temperature=0, max_tokens=6, n=2)
    answers = [generator.answer([generator.text_ids(text)], sampling)[0].text for text in texts]
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [answers[0]] * 2 + [answers[1]] * 2
    assert both.usage.prompt_tokens == sum(len(generator.text_ids(text)) for text in texts)
    with pytest.raises(openai.BadRequestError, match="a token id outside the vocabulary"):
        client.completions.create(model="x", prompt=[1, len(generator.tokenizer)], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="several prompts are answered with whole answers only"):
        client.completions.create(model="x", prompt=texts, max_tokens=1, stream=True)


def test_echo_scores_the_token_that_ended_the_answer(generator):
    """lm-evaluation-harness reads echo + max_tokens 1 as prompt, then one generated token: an answer ended by its
    end token at once has that token scored (as vLLM does), or the harness would take a prompt token for it."""
    import asyncio

    from alpaca_lora.generate import Answer
    from alpaca_lora.server import _logprobs

    ids, end = generator.text_ids("Say hi."), generator.stop_ids[0]
    ended = Answer("", len(ids), 0, "stop", token_ids=[], end_token=end)
    echoed = asyncio.run(_logprobs(generator, generator.name, ids, ended, chat=False, top=0, echo=True))
    direct = [logprob for _, logprob, _ in generator.token_logprobs(ids + [end], 1)]
    assert len(echoed["token_logprobs"]) == len(ids) + 1
    assert echoed["token_logprobs"][1:] == pytest.approx(direct, abs=1e-6)
    # without echo, an answer's log-probabilities are its text's tokens only, as OpenAI's
    assert asyncio.run(_logprobs(generator, generator.name, ids, ended, chat=False, top=0, echo=False))[
        "token_logprobs"] == []


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "stream": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_logprobs_asked_wrongly_are_400s(client, body, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="x", **body)
    assert error.value.body["param"] == param


def test_keep_alive_answers_are_not_held_back(server):
    import http.client
    import time

    host, port = _address(server)
    connection = http.client.HTTPConnection(host, port)
    times = []
    for _ in range(6):
        started = time.perf_counter()
        connection.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert connection.getresponse().read()
        times.append(time.perf_counter() - started)
    connection.close()
    assert sorted(times[1:])[2] < 0.03  # the median on a reused connection; Nagle + delayed ACK cost 40 ms each


def test_twenty_streams_with_hang_ups_leave_memory_flat_and_answers_right(server, client):
    import socket
    import threading

    def resident_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

    messages = [{"role": "user", "content": "Name three fruits."}]
    expected = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16)
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": 16, "stream": True}).encode()

    def one(i):
        with socket.create_connection(_address(server), timeout=60) as connection:
            connection.sendall(_post("/v1/chat/completions", body))
            connection.recv(1024 if i % 2 else 65536)  # half hang up after the first bytes
            if i % 2 == 0:
                while connection.recv(65536):
                    pass
    for round_ in range(2):
        before = resident_mb() if round_ else None
        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert resident_mb() - before < 50  # the second round of 20 added nothing that stays
    again = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16)
    assert again.choices[0].message.content == expected.choices[0].message.content
