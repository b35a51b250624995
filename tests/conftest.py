"""Shared fixtures: a tiny LLaMA built in about a second, small Alpaca files, the real LLaMA tokenizer, training
settings for it, and a fake OpenAI-compatible server. No test module imports another: what two share is here."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
LLAMA_TOKENIZER = SHARED / "models" / "llama-tokenizer" / "tokenizer.model"
ALPACA_CLEANED = SHARED / "data" / "alpaca_sample_cleaned.json"
ALPACA_ORIGINAL = SHARED / "data" / "alpaca_sample_original.json"


# Tests of device-dependent code run on the CPU everywhere and also on CUDA where a GPU is present
# (CI has none: those cases are reported as skipped; they were run on a lent GPU, see the README).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA GPU here; run this on a GPU machine"))]


@pytest.fixture(scope="session", autouse=True)
def home_of_its_own(tmp_path_factory):
    """Tests and the commands they run write nothing under the user's home (the tokenization cache defaults to
    ~/.cache/alpaca-lora); tests that train pass tokenized_cache_dir="" besides, so no run reads another's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    yield
    patch.undo()


def needs_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (../shared is not beside this clone)")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide LLaMA with random weights and a 512-piece SentencePiece tokenizer."""
    from alpaca_lora.demo import DemoConfig, build_demo_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    return build_demo_model(DemoConfig(output_dir=str(folder), vocab_size=512, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, pretrain_steps=0))


@pytest.fixture(scope="session")
def alpaca_rows() -> list[dict]:
    """48 Alpaca rows in the project's own words (the seed tasks), a third of them with an input."""
    rows = []
    for line in (REPO / "data" / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        rows.append({"instruction": task["instruction"], "input": task["instances"][0]["input"],
                     "output": task["instances"][0]["output"]})
    return rows[:48]


@pytest.fixture
def alpaca_file(tmp_path, alpaca_rows) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(alpaca_rows))
    return path


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    """The real LLaMA tokenizer from ../shared, loaded the way users load it: from a folder."""
    if not LLAMA_TOKENIZER.exists():
        pytest.skip(f"{LLAMA_TOKENIZER} is absent (../shared is not beside this clone)")
    from alpaca_lora.demo import save_llama_tokenizer

    return save_llama_tokenizer(tmp_path_factory.mktemp("llama-tokenizer"), LLAMA_TOKENIZER.read_bytes())


def run_script(*args, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_config(base, data, out, **overrides):
    """40 training rows, 8 held out: 5 steps of 8 examples per epoch, fp32 so results are exact (also on a
    GPU, where 8-bit would otherwise be the default); no tokenization cache."""
    from alpaca_lora.config import TrainConfig

    settings = dict(base_model=str(base), data_path=str(data), output_dir=str(out), batch_size=8, micro_batch_size=4,
                    num_epochs=1, val_set_size=8, cutoff_len=512, learning_rate=1e-2, warmup_steps=1,
                    logging_steps=1, eval_steps=100, save_steps=100, bf16=False, load_8bit=False, seed=0,
                    tokenized_cache_dir="")
    return TrainConfig(**{**settings, **overrides})


def losses(history):
    return [record["loss"] for record in history]


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, alpaca_rows, tmp_path_factory) -> Path:
    """A LoRA adapter trained for 2 steps on the tiny base, as finetune.py writes it."""
    from alpaca_lora.config import TrainConfig
    from alpaca_lora.train import train

    folder = tmp_path_factory.mktemp("adapter")
    data = folder / "rows.json"
    data.write_text(json.dumps(alpaca_rows))
    train(TrainConfig(base_model=str(tiny_base), data_path=str(data), output_dir=str(folder / "adapter"), batch_size=8,
                      micro_batch_size=4, max_steps=2, val_set_size=0, cutoff_len=512, learning_rate=5e-2,
                      warmup_steps=0, bf16=False, tokenized_cache_dir=""))
    return folder / "adapter"


class FakeAPI:
    """Answers POST /v1/chat/completions from a script of (status, body or text, headers, delay) entries;
    the last entry repeats."""

    def __init__(self, script):
        self.script, self.calls, self.lock = list(script), [], threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.calls.append({"body": body, "authorization": self.headers.get("Authorization")})
                    entry = api.script.pop(0) if len(api.script) > 1 else api.script[0]
                status, content, headers, delay = entry
                time.sleep(delay)
                if status == 200:
                    text, finish = content if isinstance(content, tuple) else (content, "stop")
                    content = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                            "finish_reason": finish}],
                               "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}
                data = json.dumps(content).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def ok(content):
    return (200, content, {}, 0)


@pytest.fixture
def fake_api(request):
    servers = []

    def start(script):
        servers.append(FakeAPI(script))
        return servers[-1]
    yield start
    for server in servers:
        server.close()
