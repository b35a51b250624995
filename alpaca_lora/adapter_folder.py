"""The adapter folder: what finetune.py leaves behind, and the one place that reads and writes its description.

    adapter_model.safetensors, adapter_config.json   peft's own save (written last: a folder without them is
                                                      not finished)
    tokenizer files                                   the tokenizer trained with, pad token included
    training_summary.json                             a TrainingSummary: base model, template, flags, data, results
    validation_rows.json                              the rows held out, for `evaluate.py loss`
    README.md                                         the model card, made from the summary

generate.py, export_hf.py and evaluate.py need only this folder: `describe_adapter` tells them the base model and
the template, and the summary holds the rest.
"""

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import write_text_atomically

SUMMARY_FILE = "training_summary.json"
VALIDATION_FILE = "validation_rows.json"
MODEL_CARD_FILE = "README.md"
PUBLISHED_FILES = ("adapter_model.safetensors", "adapter_config.json", MODEL_CARD_FILE, SUMMARY_FILE)  # W&B artifact


@dataclass
class DataSummary:
    path: str  # the --data_path trained on
    sha256: str  # of the file's bytes, or the dataset's fingerprint
    rows: int
    bad_rows_dropped: int
    train_rows: int
    validation_rows: int
    truncated_examples: int  # cut at cutoff_len: no EOS learned for them
    examples_without_targets: int  # dropped: the prompt alone filled cutoff_len
    validation_file: str | None


@dataclass
class TrainingSummary:
    base_model: str
    prompt_template: dict  # PromptTemplate.to_dict(): the template itself, not only its name
    arguments: dict  # every TrainConfig field as validated, plus world_size
    data: DataSummary
    precision: str  # "8bit", "4bit", "bf16" or "fp32"
    gradient_checkpointing: bool
    attention: str  # the implementation the loaded model used
    gpu_memory_mb: dict | None  # allocated by PyTorch on this process's GPU
    device: str
    steps: int
    final_train_loss: float | None
    final_validation_loss: float | None
    real_tokens_per_second: float | None
    padding_fraction: float | None
    train_seconds: float
    wall_seconds: float
    versions: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingSummary":
        return cls(**{**saved, "data": DataSummary(**saved["data"])})


@dataclass(frozen=True)
class AdapterDescription:
    base_model: str
    prompt_template: str | None  # the template's name; None for an adapter made elsewhere
    summary: TrainingSummary | None  # None for an adapter made elsewhere (peft's files only)


def describe_adapter(lora_weights: str) -> AdapterDescription:
    """What an adapter folder says about itself: base model, template and, if finetune.py wrote it, its summary."""
    folder = Path(lora_weights).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"--lora_weights {lora_weights}: no adapter_config.json there; pass a folder finetune.py wrote")
    peft_config = _read_json(folder / "adapter_config.json", "--lora_weights")
    summary_file = folder / SUMMARY_FILE
    if not summary_file.is_file():
        return AdapterDescription(peft_config.get("base_model_name_or_path") or "", None, None)
    try:
        summary = TrainingSummary.from_dict(_read_json(summary_file, "--lora_weights"))
    except (TypeError, KeyError):
        raise ValueError(f"--lora_weights {lora_weights}: {SUMMARY_FILE} is not a training summary this version "
                         "reads; retrain, or remove the file and pass --base_model and --prompt_template") from None
    return AdapterDescription(summary.base_model, summary.prompt_template["name"], summary)


def _read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{flag} {path.parent}: {path.name} cannot be read ({error}); the folder is damaged") from None


def save_adapter(output_dir: Path, model, tokenizer, summary: TrainingSummary, validation_rows: list[dict]) -> None:
    """Everything the folder holds; the weights go last (through a staging folder beside them), so a folder
    interrupted while saving has no adapter_model.safetensors and does not look finished."""
    tokenizer.save_pretrained(output_dir)
    if validation_rows:
        write_text_atomically(output_dir / VALIDATION_FILE, json.dumps(validation_rows, indent=1, ensure_ascii=False))
    write_text_atomically(output_dir / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2))
    write_text_atomically(output_dir / MODEL_CARD_FILE, model_card(summary))
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".saving-") as staging:
        model.save_pretrained(staging)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(Path(staging) / name, output_dir / name)


def arguments_table(arguments: dict) -> str:
    """The training flags as a markdown table, for the adapter's model card and an export's."""
    return "| flag | value |\n| --- | --- |\n" + "\n".join(f"| `{k}` | `{v}` |" for k, v in arguments.items())


def model_card(summary: TrainingSummary) -> str:
    """The README.md of an adapter folder: what it is, how it was made, and what it must not be used for."""
    data, val, gpu = summary.data, summary.final_validation_loss, summary.gpu_memory_mb
    memory = f" (peak GPU memory {max(gpu['peak_while_loading'], gpu['peak_while_training']) / 1024:.1f} GB)" if gpu else ""
    return f"""---
library_name: peft
base_model: {summary.base_model}
tags: [alpaca, lora, instruction-tuning, alpaca-lora]
license: other
---

# LoRA adapter for {summary.base_model}

An instruction-following LoRA adapter trained with alpaca-lora on Alpaca-format data, prompt template
`{summary.prompt_template['name']}`. Load it with `peft.PeftModel.from_pretrained(base, this_folder)`, or
`python generate.py --lora_weights this_folder`.

## Data
- source: `{data.path}` (sha256 `{data.sha256}`)
- {data.rows} rows, {data.bad_rows_dropped} bad rows dropped; {data.train_rows} trained on, {data.validation_rows} held out
  for validation{' (`' + data.validation_file + '`)' if data.validation_file else ''}
- {data.truncated_examples} training examples were cut at cutoff_len {summary.arguments['cutoff_len']} (no EOS learned for them)

## Evaluation
- final training loss (last step): {summary.final_train_loss:.4f}
- validation loss (per response token): {f'{val:.4f} (perplexity {math.exp(val):.2f})' if val is not None else 'not measured (val_set_size 0)'}
- {summary.steps} optimizer steps, {summary.precision} on {summary.device} ({summary.attention} attention){memory}, {summary.wall_seconds:.0f} s

## Training arguments
{arguments_table(summary.arguments)}

## Licences
The base model's weights keep their own licence, which also governs this adapter's use with them. The
Stanford Alpaca data is CC BY-NC 4.0 (non-commercial); data generated through the OpenAI API is also
subject to its terms of use. Check the licence of whatever data you trained on: it follows the adapter.

## Limitations
For research. Models like this hallucinate facts, follow harmful instructions, and reproduce the biases
of their base model and of the generated training data. They have not been evaluated for safety.
"""
