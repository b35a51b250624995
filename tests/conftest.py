"""Shared fixtures: a tiny LLaMA built in about a second, small Alpaca files, the real LLaMA tokenizer, training
settings for it, and a fake OpenAI-compatible server. No test module imports another: what two share is here."""

import json
import shutil
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


def nudge_lora_b(peft_model, scale: float = 0.05):
    """lora_B starts at zero, which would hide wrong lora_A gradients: give it seeded values. Returns the model."""
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return peft_model


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


@pytest.fixture(scope="session")
def second_tiny_adapter(tiny_base, alpaca_rows, tmp_path_factory) -> Path:
    """Another adapter of the tiny base, like tiny_adapter but trained on the rows backwards at another rate."""
    from alpaca_lora.config import TrainConfig
    from alpaca_lora.train import train

    folder = tmp_path_factory.mktemp("second-adapter")
    data = folder / "rows.json"
    data.write_text(json.dumps(alpaca_rows[::-1]))
    train(TrainConfig(base_model=str(tiny_base), data_path=str(data), output_dir=str(folder / "adapter"), batch_size=8,
                      micro_batch_size=4, max_steps=2, val_set_size=0, cutoff_len=512, learning_rate=1e-1,
                      warmup_steps=0, bf16=False, tokenized_cache_dir="", seed=1))
    return folder / "adapter"


@pytest.fixture(scope="session")
def tiny_chat_adapter(tiny_base, tmp_path_factory) -> Path:
    """A LoRA adapter trained for 2 steps on multi-turn conversations under the mistral chat template (the tiny
    base's vocabulary is LLaMA-style: [INST] is text, </s> ends a turn)."""
    from alpaca_lora.config import TrainConfig
    from alpaca_lora.train import train

    folder = tmp_path_factory.mktemp("chat-adapter")
    data = folder / "chat.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in conversations() * 4))
    train(TrainConfig(base_model=str(tiny_base), data_path=str(data), output_dir=str(folder / "adapter"), batch_size=4,
                      micro_batch_size=2, max_steps=2, val_set_size=2, cutoff_len=512, learning_rate=5e-2,
                      warmup_steps=0, bf16=False, tokenized_cache_dir="", chat_template="mistral"))
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


# ---- model families: tiny random models of each architecture with a real vocabulary and chat template ----

VOCABULARIES = SHARED / "models" / "vocab"
SHARED_TEMPLATES = SHARED / "chat_templates"
# family -> (transformers config class, its settings, vocabulary, the chat template its instruct models use).
# Sliding windows of 12 tokens are shorter than every test conversation, so the windowed layers are exercised;
# Gemma's logit caps are small enough to change the loss of a random model (its logits are ~0.1).
FAMILIES = {
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True), "llama-bpe", "meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "mistral": ("MistralConfig", dict(sliding_window=12), "llama-spm", "mistral"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), "qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja"),
    "qwen3": ("Qwen3Config", dict(head_dim=8), "qwen2", "Qwen-Qwen3-0.6B.jinja"),
    "gemma2": ("Gemma2Config", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=12,
                                    final_logit_softcapping=0.05, attn_logit_softcapping=0.5), "gemma",
               "google-gemma-2-2b-it.jinja"),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=12,
                                        final_logit_softcapping=0.05, layer_types=["sliding_attention", "full_attention"]),
               "gemma", "gemma"),
    "phi3": ("Phi3Config", dict(), "phi-3", "microsoft-Phi-3.5-mini-instruct.jinja"),
}
# each shared template with the real vocabulary of its family (SmolLM3's is Llama 3's with ChatML markers, which
# Qwen2's vocabulary holds as special tokens; Mistral Nemo's own 131K vocabulary is not in ../shared)
TEMPLATE_VOCABULARIES = {
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama-bpe", "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama-bpe",
    "Qwen-Qwen2.5-7B-Instruct.jinja": "qwen2", "Qwen-Qwen3-0.6B.jinja": "qwen2", "HuggingFaceTB-SmolLM3-3B.jinja": "qwen2",
    "microsoft-Phi-3.5-mini-instruct.jinja": "phi-3", "mistralai-Mistral-Nemo-Instruct-2407.jinja": "llama-spm",
    "google-gemma-2-2b-it.jinja": "gemma",
    "alpaca": "llama-spm", "chatml": "qwen2", "llama3": "llama-bpe", "gemma": "gemma", "mistral": "llama-spm",
    "phi3": "phi-3",
}
GEMMA_SPECIAL = ["<start_of_turn>", "<end_of_turn>"]


def chat_template_path(name: str) -> str:
    """A shared template's path, or a shipped template's name, as --chat_template takes them."""
    if not name.endswith(".jinja"):
        return name
    if not (SHARED_TEMPLATES / name).exists():
        pytest.skip(f"{SHARED_TEMPLATES / name} is absent (../shared is not beside this clone)")
    return str(SHARED_TEMPLATES / name)


@pytest.fixture(scope="session")
def vocabulary(tmp_path_factory, alpaca_rows):
    """vocabulary name -> a tokenizer folder: llama.cpp's GGUF vocabularies of real models (converted once: Llama 3's
    takes ~20 s), or for Gemma a SentencePiece tokenizer trained here with Gemma's special tokens."""
    folders = {}

    def folder(name: str) -> Path:
        if name not in folders:
            folders[name] = _gemma_tokenizer(tmp_path_factory.mktemp("gemma-vocab"), alpaca_rows) if name == "gemma" \
                else _gguf_tokenizer(tmp_path_factory.mktemp(name), name)
        return folders[name]
    return folder


def _gguf_tokenizer(folder: Path, name: str) -> Path:
    """The tokenizer folder a model of that vocabulary ships: tokenizer.json, and for SentencePiece vocabularies the
    tokenizer.model (pieces, scores and types as llama.cpp's file holds them)."""
    import gguf
    import sentencepiece.sentencepiece_model_pb2 as model_pb2
    from transformers import AutoTokenizer

    path = VOCABULARIES / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside this clone)")
    AutoTokenizer.from_pretrained(VOCABULARIES, gguf_file=path.name).save_pretrained(folder)
    if name in ("llama-spm", "phi-3"):  # the SentencePiece ones (gguf's reader takes ~20 s on a 128K BPE vocabulary)
        reader = gguf.GGUFReader(str(path))
        model = model_pb2.ModelProto()
        fields = [reader.fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "scores", "token_type")]
        for i, (piece, score, kind) in enumerate(zip(*fields)):
            # GGUF numbers token types as SentencePiece does; Phi-3's file also marks its padding pieces unknown,
            # which SentencePiece allows one piece to be
            kind = model_pb2.ModelProto.SentencePiece.UNUSED if kind == 2 and i else kind
            model.pieces.add(piece=piece, score=score, type=kind)
        model.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
        model.trainer_spec.byte_fallback = True
        model.normalizer_spec.add_dummy_prefix = True
        model.normalizer_spec.remove_extra_whitespaces = False
        model.normalizer_spec.name = "identity"
        (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    return folder


def _gemma_tokenizer(folder: Path, rows) -> Path:
    """Gemma's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then <start_of_turn> and <end_of_turn> as special tokens."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    model_file = io.BytesIO()
    sentences = [text for row in rows for text in row.values() if text] + ["model", "user", "system"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model_file, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=GEMMA_SPECIAL, hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "extra_special_tokens": GEMMA_SPECIAL}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_base(vocabulary, tmp_path_factory):
    """family -> the folder of a tiny random model of that architecture (2 layers, 32 wide) with its vocabulary;
    `overrides` change its config (a separate folder each)."""
    bases = {}

    def base(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in bases:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            config_class, settings, vocab, _ = FAMILIES[family]
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            tokenizer = AutoTokenizer.from_pretrained(vocabulary(vocab))
            config = getattr(transformers, config_class)(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **{**settings, **overrides})
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            tokenizer.chat_template = None  # a base model's tokenizer ships without one
            tokenizer.save_pretrained(folder)
            if (vocabulary(vocab) / "tokenizer.model").is_file():
                shutil.copy(vocabulary(vocab) / "tokenizer.model", folder)
            bases[key] = folder
        return bases[key]
    return base


def conversations() -> list[dict]:
    """Multi-turn rows in the OpenAI shape, with and without a system message."""
    return [
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                      {"role": "user", "content": "And another?"},
                      {"role": "assistant", "content": "Green, like grass in spring."}]},
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
                      {"role": "user", "content": "Times three?"}, {"role": "assistant", "content": "12, of course."}]},
        {"messages": [{"role": "user", "content": "Write a haiku about rain."},
                      {"role": "assistant", "content": "Soft rain on the roof,\nthe garden drinks in silence,\n"
                                                       "puddles hold the sky."}]},
    ]


LLAMA_CPP_CHAT_PROMPT = REPO / "tests" / "llama_cpp_chat_prompt" / "build" / "chat_prompt"


@pytest.fixture(scope="session")
def llama_cpp_chat_prompt():
    """(GGUF path, messages) -> (token ids, prompt text) as llama-server makes them from the file's chat template:
    llama.cpp's own template engine and tokenizer (tests/llama_cpp_chat_prompt/build.sh builds it; .ci/run does)."""
    import subprocess

    if not LLAMA_CPP_CHAT_PROMPT.is_file():
        pytest.skip(f"{LLAMA_CPP_CHAT_PROMPT} is not built: bash tests/llama_cpp_chat_prompt/build.sh")

    def chat_prompt(gguf: Path, messages: list[dict]) -> tuple[list[int], str]:
        printed = subprocess.run([str(LLAMA_CPP_CHAT_PROMPT), str(gguf)], input=json.dumps(messages), text=True,
                                 capture_output=True, check=True).stdout
        ids, text = printed.split("\n", 1)
        return [int(i) for i in ids.split()], text
    return chat_prompt


def supports_system(template: str) -> bool:
    # Gemma 2's template raises on a system message; Mistral Nemo's leaves it out of trained conversations
    return "gemma-2" not in template and "Mistral-Nemo" not in template
