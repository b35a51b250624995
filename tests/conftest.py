"""Shared fixtures: a tiny LLaMA built in about a second, small Alpaca files, the real LLaMA tokenizer."""

import json
import subprocess
import sys
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


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, alpaca_rows, tmp_path_factory) -> Path:
    """A LoRA adapter trained for 2 steps on the tiny base, as finetune.py writes it."""
    from alpaca_lora.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("adapter")
    data = folder / "rows.json"
    data.write_text(json.dumps(alpaca_rows))
    train(TrainConfig(base_model=str(tiny_base), data_path=str(data), output_dir=str(folder / "adapter"), batch_size=8,
                      micro_batch_size=4, max_steps=2, val_set_size=0, cutoff_len=512, learning_rate=5e-2,
                      warmup_steps=0, bf16=False, tokenized_cache_dir=""))
    return folder / "adapter"
