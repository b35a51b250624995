"""The adapter folder: what finetune.py leaves behind, and the one place that reads and writes its description.

    adapter_model.safetensors, adapter_config.json   peft's own save (written last: a folder without them is
                                                      not finished)
    tokenizer files                                   the tokenizer trained with, pad token and chat template included
    generation_config.json                            the tokens that end an answer (EOS and the end-of-turn marker)
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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import PREFIX as CHECKPOINT_PREFIX
from .errors import first_line
from .files import write_text_atomically

SUMMARY_FILE = "training_summary.json"
VALIDATION_FILE = "validation_rows.json"
MODEL_CARD_FILE = "README.md"
FINISHED_FILES = ("adapter_model.safetensors", "adapter_config.json", SUMMARY_FILE, MODEL_CARD_FILE, VALIDATION_FILE,
                  "generation_config.json")
LOCK_FILE = ".alpaca-lora.lock"
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
    duplicate_rows: int = 0  # rows repeating an earlier one exactly (kept on one side of the split)


@dataclass
class TrainingSummary:
    base_model: str
    prompt_template: dict | None  # PromptTemplate.to_dict() (the template itself) where Alpaca rows trained without a chat template
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
    chat_template: dict | None = None  # ChatTemplate.to_dict(): its name and Jinja source, where one was used

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingSummary":
        return cls(**{**saved, "data": DataSummary(**saved["data"])})


@dataclass(frozen=True)
class AdapterDescription:
    folder: Path
    base_model: str
    prompt_template: str | None  # the Alpaca template's name; None for a chat adapter or one made elsewhere
    summary: TrainingSummary | None  # None for an adapter made elsewhere (peft's files only)
    chat_template: dict | None = None  # {name, source} of the chat template trained with

    def base_model_or(self, base_model: str) -> str:
        """--base_model if given, else the base this adapter names, which must still be where it was."""
        if base_model:
            return base_model
        named = self.base_model
        source = SUMMARY_FILE if self.summary else "adapter_config.json"
        if not named:
            raise ValueError(f"--lora_weights {self.folder}: its {source} names no base model; pass --base_model")
        if named.startswith(("/", ".", "~")) and not Path(named).expanduser().exists():
            raise ValueError(f"--lora_weights {self.folder}: its {source} names the base model {named}, which is not "
                             "there any more; pass --base_model with where it is now")
        return named


def describe_adapter(lora_weights: str) -> AdapterDescription:
    """What an adapter folder says about itself: base model, template and, if finetune.py wrote it, its summary."""
    folder = Path(lora_weights).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"--lora_weights {lora_weights}: no adapter_config.json there; pass a folder finetune.py wrote")
    peft_config = _read_json(folder / "adapter_config.json", "--lora_weights")
    check_adapter_weights(folder, "--lora_weights")
    summary_file = folder / SUMMARY_FILE
    if not summary_file.is_file():
        return AdapterDescription(folder, peft_config.get("base_model_name_or_path") or "", None, None)
    try:
        summary = TrainingSummary.from_dict(_read_json(summary_file, "--lora_weights"))
    except (TypeError, KeyError):
        raise ValueError(f"--lora_weights {lora_weights}: {SUMMARY_FILE} is not a training summary this version "
                         "reads; retrain, or remove the file and pass --base_model and --prompt_template") from None
    return AdapterDescription(folder, summary.base_model, (summary.prompt_template or {}).get("name"), summary,
                              summary.chat_template)


def check_adapter_weights(folder: Path, flag: str) -> None:
    """Read every tensor of adapter_model.safetensors once, so that a truncated or damaged file is one error
    naming it, not a traceback from deep inside peft (an adapter is megabytes: this costs little)."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{flag} {folder}: no adapter_model.safetensors there; the folder is not a finished adapter")
    try:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                weights.get_tensor(name)
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError for an unreadable file
        reason = first_line(error)
        raise ValueError(f"{flag} {folder}: adapter_model.safetensors is damaged or cut short ({reason}); "
                         "copy it again or retrain") from None


def _read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{flag} {path.parent}: {path.name} cannot be read ({error}); the folder is damaged") from None


def claim_output_dir(output_dir: str, overwrite: bool, resume_checkpoint: Path | None):
    """Create output_dir, prove it writable, and lock it for this run: a second run into the same folder is
    refused while this one lives (the lock goes with the process, however it ends). A folder that holds a
    finished adapter, or checkpoints of a run this one does not continue, is refused unless `overwrite`; with it
    they are removed first, so that a run killed before it finishes never leaves the old adapter looking like
    its own. Returns the folder and the lock, held until it is closed."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / LOCK_FILE, "a")
    except OSError as error:
        raise ValueError(f"--output_dir {output_dir}: not writable ({error.strerror or error}); "
                         "choose a folder you can write to") from None
    try:
        import fcntl  # POSIX; elsewhere runs are not kept apart

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"--output_dir {output_dir}: another run is writing to it now; wait for it to end or "
                         "choose another folder") from None
    except ImportError:
        pass
    continuing = resume_checkpoint is not None and resume_checkpoint.resolve().parent == path.resolve()
    finished = [path / name for name in FINISHED_FILES if (path / name).is_file()]
    checkpoints = [] if continuing else sorted(path.glob(f"{CHECKPOINT_PREFIX}*"))
    has_adapter = (path / "adapter_model.safetensors").is_file()
    if (has_adapter or checkpoints) and not overwrite:
        lock.close()
        what = ("a finished adapter (adapter_model.safetensors);" if has_adapter else
                f"checkpoints of another run ({checkpoints[-1].name}); pass --resume_from_checkpoint to continue it,")
        raise ValueError(f"--output_dir {output_dir}: holds {what} pass --overwrite_output_dir to replace it, or "
                         "choose another folder")
    for old in finished:  # the weights first: from here on the folder does not pass for a finished adapter
        old.unlink()
    for old in checkpoints:
        shutil.rmtree(old)
    return path, lock


def save_adapter(output_dir: Path, model, tokenizer, summary: TrainingSummary, validation_rows: list[dict],
                 stop_token_ids: list[int]) -> None:
    """Everything the folder holds; the weights go last (through a staging folder beside them), so a folder
    interrupted while saving has no adapter_model.safetensors and does not look finished."""
    from transformers import GenerationConfig

    if summary.chat_template:  # the tokenizer files carry the template trained with (chat_template.jinja)
        tokenizer.chat_template = summary.chat_template["source"]
    tokenizer.save_pretrained(output_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(output_dir)
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


def _prompt_format(summary: TrainingSummary) -> str:
    if summary.chat_template:
        return (f"chat template `{summary.chat_template['name']}` (in this folder's tokenizer files: "
                "`tokenizer.apply_chat_template` renders prompts exactly as in training)")
    return f"Alpaca prompt template `{summary.prompt_template['name']}`"


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

An instruction-following LoRA adapter trained with alpaca-lora, {_prompt_format(summary)}. Load it with
`peft.PeftModel.from_pretrained(base, this_folder)`, or `python generate.py --lora_weights this_folder`.

## Data
- source: `{data.path}` (sha256 `{data.sha256}`)
- {data.rows} rows, {data.bad_rows_dropped} bad rows dropped; {data.train_rows} trained on, {data.validation_rows} held out
  for validation{' (`' + data.validation_file + '`)' if data.validation_file else ''}
- {data.duplicate_rows} rows repeat an earlier row exactly (each row's copies are all on one side of the split)
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
