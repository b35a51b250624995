"""Harness: lm-evaluation-harness tasks on base + adapter, in-process, with the results written beside the other
evaluation reports and into the adapter's model card.

lm-evaluation-harness (lm_eval) does the evaluating: its HF model loads the base and the adapter (`peft=`), its tasks
build the prompts and score them. What this adds is the toolkit's layout (BOS once at the start of every sequence, as
in training), its defaults (fp32 where bf16 is slow, the adapter folder's tokenizer), one-line errors for a task that
does not exist or whose data cannot be fetched, and the report. The same numbers come through the server:
lm_eval's `local-completions` model asks /v1/completions for the log-probabilities of token ids it laid out itself
(tests/test_harness.py checks both ways agree).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .adapter_folder import MODEL_CARD_FILE, describe_adapter
from .errors import first_line
from .files import write_text_atomically

CARD_START, CARD_END = "<!-- lm-evaluation-harness -->", "<!-- /lm-evaluation-harness -->"


@dataclass
class HarnessConfig:
    """Every flag of evaluate.py harness, with its default."""

    lora_weights: str = field(default="", metadata={"help": "adapter folder from finetune.py (none: the base alone)"})
    base_model: str = field(default="", metadata={"help": "hub id or folder of the base model (default: the one the adapter names)"})
    tasks: object = field(default="", metadata={"help": "lm-evaluation-harness task names, e.g. '[hellaswag,arc_easy]'"})
    include_path: str = field(default="", metadata={
        "help": "a folder of task YAMLs to add (local tasks whose data needs no network, e.g. tests/harness_task)"})
    num_fewshot: int | None = field(default=None, metadata={"help": "examples shown before each question (default: the task's)"})
    limit: float | None = field(default=None, metadata={
        "help": "at most this many examples per task (below 1: this share of them); a quick look, not a score"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 weights; default: where bf16 is fast, fp32 otherwise"})
    output_dir: str = field(default="./evaluation", metadata={
        "help": "harness.json, harness.md and harness_samples.jsonl (every question's scores) go here"})


def run_harness(config: HarnessConfig, write=print) -> dict:
    """Score the tasks; write output_dir/harness.json, .md and _samples.jsonl, and the scores into the adapter's
    model card."""
    import torch

    from .model import fast_bf16_available

    tasks = _task_names(config.tasks)
    if config.num_fewshot is not None and (isinstance(config.num_fewshot, bool) or config.num_fewshot < 0):
        raise ValueError(f"--num_fewshot {config.num_fewshot!r}: must be a whole number >= 0")
    if config.limit is not None and (isinstance(config.limit, bool) or not config.limit > 0):
        raise ValueError(f"--limit {config.limit!r}: must be a number > 0 (below 1: a share of each task)")
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"--batch_size {config.batch_size!r}: must be a whole number >= 1")
    if config.include_path and not Path(config.include_path).expanduser().is_dir():
        raise ValueError(f"--include_path {config.include_path}: no such folder")
    adapter = describe_adapter(config.lora_weights) if config.lora_weights else None
    base_model = adapter.base_model_or(config.base_model) if adapter else config.base_model
    if not base_model:
        raise ValueError("--base_model is required (or an adapter folder that names its base model)")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(Path(config.include_path).expanduser()) if config.include_path else None)
    for task in tasks:
        if task not in manager.all_tasks:
            raise ValueError(f"--tasks {task}: no such lm-evaluation-harness task"
                             f"{' (nor in --include_path)' if config.include_path else ''}; `lm_eval ls tasks` lists "
                             "them, --include_path adds a folder of your own")
    try:  # fetch every task's data now: a hub dataset without network is one error, before the model loads
        get_task_dict(tasks, manager)
    except Exception as error:  # datasets and the hub raise many kinds: all mean the data is not there
        raise ValueError(f"--tasks {','.join(tasks)}: the data could not be loaded ({first_line(error)}); without "
                         "network only tasks whose data is on this machine work (a YAML and its data under "
                         "--include_path)") from None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (fast_bf16_available(torch.device(device)) if config.bf16 is None else config.bf16) \
        else torch.float32
    tokenizer = adapter.folder if adapter and (adapter.folder / "tokenizer_config.json").exists() else base_model
    # BOS once at the start, as training lays sequences out; log-softmax in fp32 whatever the weights' dtype
    model = HFLM(pretrained=base_model, peft=str(adapter.folder) if adapter else None, tokenizer=str(tokenizer),
                 device=device, dtype=dtype, softmax_dtype=torch.float32, batch_size=config.batch_size,
                 add_bos_token=True)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=config.num_fewshot, limit=config.limit,
                                      task_manager=manager, log_samples=True)
    report = {"base_model": base_model, "lora_weights": str(adapter.folder) if adapter else None, "tasks": tasks,
              "num_fewshot": config.num_fewshot, "limit": config.limit, "dtype": str(dtype).replace("torch.", ""),
              "lm_eval_version": lm_eval.__version__, "results": results["results"],
              "samples": {task: n["effective"] for task, n in results.get("n-samples", {}).items()}}
    table = markdown_table(report)
    output_dir = Path(config.output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "harness.json", json.dumps(report, indent=2, default=str))
    write_text_atomically(output_dir / "harness.md", table)
    # each question's requests, log-likelihoods and scores, to look into (the document itself left out)
    write_text_atomically(output_dir / "harness_samples.jsonl", "".join(
        json.dumps({"task": task, **{k: v for k, v in sample.items() if k not in ("doc", "resps")}}, default=str) + "\n"
        for task, samples in results.get("samples", {}).items() for sample in samples))
    if adapter:
        card = adapter.folder / MODEL_CARD_FILE
        write_text_atomically(card, with_harness_section(card.read_text() if card.exists() else "", table))
    write(table)
    write(f"wrote {output_dir / 'harness.json'}" + (f" and the scores into {adapter.folder / MODEL_CARD_FILE}"
                                                    if adapter else ""))
    return report


def _task_names(tasks) -> list[str]:
    """--tasks as names: fire gives '[a,b]' and 'a,b' as a list or tuple, 'a' as a string."""
    names = [tasks] if isinstance(tasks, str) else list(tasks) if isinstance(tasks, (list, tuple)) else None
    names = [part.strip() for name in names or [] for part in str(name).split(",") if part.strip()]
    if not names:
        raise ValueError(f"--tasks {tasks!r}: name at least one lm-evaluation-harness task, e.g. --tasks "
                         "'[hellaswag,arc_easy]'")
    return names


def markdown_table(report: dict) -> str:
    """Each task's metrics (value and standard error) as a markdown table, with how they were measured."""
    rows = []
    for task, metrics in report["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if "," not in key or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            rows.append(f"| {task} | {metric} | {value:.4f}{spread} | {report['samples'].get(task, '')} |")
    shots = "the tasks' own" if report["num_fewshot"] is None else report["num_fewshot"]
    limit = f"; at most {report['limit']} examples per task (a quick look, not a score)" if report["limit"] else ""
    return (f"lm-evaluation-harness {report['lm_eval_version']}, in-process, {report['dtype']}; few-shot examples: "
            f"{shots}{limit}.\n\n| task | metric | value | examples |\n| --- | --- | --- | --- |\n" + "\n".join(rows)
            + "\n")


def with_harness_section(card: str, table: str) -> str:
    """The model card with its lm-evaluation-harness section put in (replacing the one an earlier run put there):
    before the training arguments where the card has them, else at its end."""
    section = f"{CARD_START}\n## lm-evaluation-harness\n\n{table}{CARD_END}\n"
    if CARD_START in card and CARD_END in card:
        return re.sub(re.escape(CARD_START) + ".*?" + re.escape(CARD_END) + "\n?", lambda _: section, card,
                      flags=re.S)
    if "\n## Training arguments" in card:
        return card.replace("\n## Training arguments", f"\n{section}\n## Training arguments", 1)
    return card + ("\n" if card and not card.endswith("\n") else "") + ("\n" if card else "") + section
