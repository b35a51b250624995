"""Demo: a tiny LLaMA-architecture model with its own SentencePiece tokenizer, built here in seconds.

The README's first command and the tests train on it, so the whole recipe runs on a CPU with no
download. The tokenizer is trained on the project's own seed tasks (data/seed_tasks.jsonl) with
LLaMA's settings (BPE, byte fallback, <unk>=0, <s>=1, </s>=2); the weights are random.
"""

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import SEED_TASKS, load_rows, validate_rows
from .model import fast_bf16_available
from .templates import available_templates, load_template


@dataclass
class DemoConfig:
    output_dir: str = field(default="./demo-llama", metadata={"help": "folder for the model and tokenizer"})
    data_path: str = field(default=str(SEED_TASKS), metadata={"help": "Alpaca-format text to train the tokenizer on"})
    vocab_size: int = field(default=1024, metadata={"help": "SentencePiece vocabulary size"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    intermediate_size: int = field(default=352, metadata={"help": "MLP width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    max_position_embeddings: int = field(default=2048, metadata={"help": "longest context"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    pretrain_steps: int = field(default=300, metadata={
        "help": "full-weight steps of next-token training on the rows' plain text, so the base knows some words"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast for the pretraining; default: where bf16 is fast (as finetune.py decides), else fp32"})


def build_demo_model(config: DemoConfig) -> Path:
    """Train the tokenizer, initialise the model, save both as a Hugging Face folder; returns the folder."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    loaded = load_rows(config.data_path)
    rows, _ = validate_rows(loaded, skip_bad_rows=True)
    templates = [load_template(name) for name in available_templates()]
    # Sentences: every field of every row, plus each template's prompt so its markers get their own pieces.
    sentences = [text for row in rows for text in (row["instruction"], row["input"], row["output"]) if text]
    sentences += [t.prompt("x", "y") for t in templates] + [t.prompt("x") for t in templates]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model_file, vocab_size=config.vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    output_dir = Path(config.output_dir).expanduser()
    tokenizer = save_llama_tokenizer(output_dir, model_file.getvalue())

    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    texts = ["\n".join(text for text in (row["instruction"], row["input"], row["output"]) if text) for row in rows]
    bf16 = fast_bf16_available(torch.device("cpu")) if config.bf16 is None else config.bf16
    _pretrain(model, tokenizer, texts, config.pretrain_steps, bf16)
    model.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(
        "# Demo LLaMA\n\nA tiny LLaMA-architecture model with random weights and a SentencePiece tokenizer trained on "
        "alpaca-lora's seed tasks, made by `make_demo_model.py` to try the fine-tuning recipe on a CPU. "
        "It knows nothing: it exists to exercise the code.\n")
    print(f"demo model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary {len(tokenizer)}, saved to {output_dir}")
    return output_dir


def save_llama_tokenizer(folder: Path, sentencepiece_model: bytes):
    """A LLaMA tokenizer folder from a SentencePiece model's bytes: tokenizer.model, its config, and the fast
    tokenizer.json converted from it. Loading a folder is the reliable way: LlamaTokenizer(vocab_file=...)
    silently yields a 3-token vocabulary in transformers 5."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _pretrain(model, tokenizer, texts: list[str], steps: int, bf16: bool, sequence_length: int = 128,
              batch_size: int = 16, report_seconds: float = 10.0) -> None:
    """A few hundred steps of plain language modelling, so the demo base is a (very small) language model
    rather than noise, as a real base is: LoRA then has something to adapt. bf16 only where it is fast: on a
    CPU without AVX512-BF16 its matmuls run ~60x slower than fp32 (an hour instead of a minute)."""
    if steps == 0:
        return
    print(f"demo pretraining: {steps} steps in {'bf16' if bf16 else 'fp32'}", flush=True)
    ids = [token for text in texts for token in [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    sequences = torch.tensor(ids[:len(ids) // sequence_length * sequence_length]).view(-1, sequence_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    last_report = time.monotonic()
    for step in range(steps):
        batch = sequences[torch.randint(len(sequences), (batch_size,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == steps or time.monotonic() - last_report > report_seconds:
            print(f"demo pretraining step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
            last_report = time.monotonic()
