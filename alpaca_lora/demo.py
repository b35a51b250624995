"""Demo: a tiny model of a chosen family with its own SentencePiece tokenizer, built here in seconds.

The README's first command and the tests train on it, so the whole recipe runs on a CPU with no
download. The tokenizer is trained on the project's own seed tasks (data/seed_tasks.jsonl) with
LLaMA's settings (BPE, byte fallback, <unk>=0, <s>=1, </s>=2), plus the special tokens of the family's chat
template (`<|im_start|>`, `<end_of_turn>`, ...); the weights are random, then briefly pretrained. Every family but
`llama` (LLaMA 1/2, trained on Alpaca prompts) gets its chat template in its tokenizer, so conversation data
needs no --chat_template.
"""

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat_template import TEMPLATES_DIR
from .data import SEED_TASKS, load_rows, validate_rows
from .model import fast_bf16_available
from .templates import available_templates, load_template


# family -> (transformers config class, its settings, the shipped chat template, that template's special tokens)
FAMILIES = {
    "llama": ("LlamaConfig", {}, None, []),
    "llama3": ("LlamaConfig", {"tie_word_embeddings": True}, "llama3",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("MistralConfig", {"sliding_window": 256}, "mistral", []),
    # no qwen2: transformers loads any tokenizer beside a Qwen2 config as Qwen2's byte-level BPE, which a
    # SentencePiece vocabulary is not (the tests build tiny Qwen2 models with Qwen2's real vocabulary instead)
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}, "chatml", ["<|im_start|>", "<|im_end|>"]),
    "gemma2": ("Gemma2Config", {"sliding_window": 256}, "gemma", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 256}, "gemma", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("Phi3Config", {}, "phi3", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}


@dataclass
class DemoConfig:
    output_dir: str = field(default="./demo-llama", metadata={"help": "folder for the model and tokenizer"})
    family: str = field(default="llama", metadata={"help": "architecture: " + ", ".join(FAMILIES)})
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
    import transformers
    from transformers import AutoModelForCausalLM

    if config.family not in FAMILIES:
        raise ValueError(f"--family {config.family!r}: use one of {', '.join(FAMILIES)}")
    config_class, settings, chat_template, special_tokens = FAMILIES[config.family]
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
        user_defined_symbols=special_tokens, num_threads=1, minloglevel=2)
    output_dir = Path(config.output_dir).expanduser()
    tokenizer = save_llama_tokenizer(output_dir, model_file.getvalue(), special_tokens,
                                     chat_template and (TEMPLATES_DIR / f"{chat_template}.jinja").read_text())

    model_config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings,
        head_dim=config.hidden_size // config.num_attention_heads, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.unk_token_id,
        **{"tie_word_embeddings": False, **settings})
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config)
    texts = ["\n".join(text for text in (row["instruction"], row["input"], row["output"]) if text) for row in rows]
    bf16 = fast_bf16_available(torch.device("cpu")) if config.bf16 is None else config.bf16
    _pretrain(model, tokenizer, texts, config.pretrain_steps, bf16)
    model.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(
        f"# Demo {config.family}\n\nA tiny {config_class[:-len('Config')]}-architecture model with random weights "
        "and a SentencePiece tokenizer trained on alpaca-lora's seed tasks, made by `make_demo_model.py` to try the "
        f"fine-tuning recipe on a CPU{f'; chat template `{chat_template}`' if chat_template else ''}. "
        "It knows nothing: it exists to exercise the code.\n")
    print(f"demo model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary {len(tokenizer)}, saved to {output_dir}")
    return output_dir


def save_llama_tokenizer(folder: Path, sentencepiece_model: bytes, special_tokens: list[str] = (),
                         chat_template: str | None = None):
    """A LLaMA tokenizer folder from a SentencePiece model's bytes: tokenizer.model, its config, and the fast
    tokenizer.json converted from it; `special_tokens` (pieces of the model) marked special, and a chat template.
    Loading a folder is the reliable way: LlamaTokenizer(vocab_file=...) silently yields a 3-token vocabulary in
    transformers 5."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "extra_special_tokens": list(special_tokens)}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = chat_template
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
