"""The OpenAI client against the server on loopback."""

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from alpaca_lora.generate import Generator, Sampling
from alpaca_lora.server import make_server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def generator(tiny_adapter):
    return Generator(lora_weights=str(tiny_adapter), bf16=False, device="cpu")


@pytest.fixture(scope="module")
def server(generator):
    httpd = make_server(generator, "127.0.0.1", 0, api_key=KEY, max_tokens_cap=64,
                        default_sampling=Sampling(temperature=0.0, max_new_tokens=16))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client, generator):
    assert [m.id for m in client.models.list()] == [generator.name]


def test_chat_is_the_templated_instruction(client, generator):
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Name a colour."}],
                                           temperature=0, max_tokens=12)
    expected = generator.answer([generator.build_prompt("Name a colour.")], Sampling(temperature=0, max_new_tokens=12))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.prompt_tokens == len(generator.prompt_ids(generator.build_prompt("Name a colour.")))
    with_input = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Translate."}],
                                                temperature=0, max_tokens=12, extra_body={"input": "Bonjour"})
    assert with_input.choices[0].message.content == generator.answer(
        [generator.build_prompt("Translate.", "Bonjour")], Sampling(temperature=0, max_new_tokens=12))[0].text


def test_completion_is_the_raw_prompt(client, generator):
    reply = client.completions.create(model="x", prompt="Once upon a time", temperature=0, max_tokens=10)
    assert reply.choices[0].text == generator.answer(["Once upon a time"], Sampling(temperature=0, max_new_tokens=10))[0].text


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
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
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
                                     headers={"Authorization": f"Bearer {KEY}"})
    assert json.loads(urllib.request.urlopen(request).read())["object"] == "text_completion"


def test_concurrent_requests_are_not_interleaved(client):
    prompts = ["Name three fruits.", "Describe the sea in one sentence.", "Count to five."]
    alone = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": p}], temperature=0,
                                            max_tokens=16).choices[0].message.content for p in prompts]
    results = [None] * len(prompts)

    def ask(i):
        chunks = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompts[i]}],
                                                temperature=0, max_tokens=16, stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_the_page_is_served_without_a_key(server):
    page = urllib.request.urlopen(server + "/").read().decode()
    assert "<title>alpaca-lora</title>" in page and "/v1/chat/completions" in page


def test_the_page_streams_an_answer_in_headless_chromium(server, client, tmp_path):
    """Type an instruction into the page, press the button, see the streamed answer (Debian's chromium)."""
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
        browser.get(server + "/")
        browser.find_element(By.ID, "instruction").send_keys("Name a colour.")
        for field, value in (("temperature", "0"), ("max_tokens", "12")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "api_key").send_keys(KEY)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "answer").get_attribute("data-done") == "true")
        shown = browser.find_element(By.ID, "answer").text
        assert browser.find_element(By.ID, "status").text == ""
    finally:
        browser.quit()
    expected = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Name a colour."}],
                                              temperature=0, max_tokens=12).choices[0].message.content
    assert shown.strip() == expected.strip() and expected
