"""Data: Alpaca rows -> validated rows -> token ids with response-only targets.

Follow one row: `load_rows` reads `{instruction, input, output}` (or a self-instruct seed task, whose
instances each become a row), `validate_rows` checks its fields, `tokenize_rows` builds

    input_ids = [BOS] + prompt tokens + response tokens + [EOS]
    targets   = the token that should follow each input position, -100 where no loss is taken

The prompt and the response are tokenized separately and concatenated, so the boundary between the
masked prompt and the trained response cannot shift (tokenizing the joined text and counting the
prompt's tokens, as Stanford's train.py does, is off by one whenever a token spans the boundary).
Targets are stored already shifted by one, so examples can be laid end to end (packing) without a
label leaking across an example boundary.

Batching (which examples share a forward pass, padded or packed) is batching.py's job.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import first_line
from .files import staged
from .templates import shipped_folder

IGNORE_INDEX = -100  # cross_entropy's ignore_index: positions that take no loss
SEED_TASKS = shipped_folder("data", "project_data") / "seed_tasks.jsonl"  # the project's own seed tasks
MAX_LISTED_BAD_ROWS = 5


@dataclass
class LoadedRows:
    rows: list[dict]
    source: str  # the file path or dataset id, for messages
    sha256: str  # of the file's bytes, or the dataset's fingerprint
    row_numbers: list[int]  # 1-based position of each row in the source (JSONL: its line number)


@dataclass
class Example:
    # int32 arrays, not lists: a Python int costs 36 bytes, so the 52K Alpaca rows took ~600 MB per process as lists
    input_ids: np.ndarray  # [length]
    targets: np.ndarray  # [length]: targets[i] is the label for the token after input_ids[i], or IGNORE_INDEX
    truncated: bool

    @property
    def num_targets(self) -> int:
        return int(np.count_nonzero(self.targets != IGNORE_INDEX))


@dataclass
class TokenizedSet:
    examples: list[Example]
    num_truncated: int  # cut at cutoff_len: no EOS, response partly lost
    num_without_targets: int  # dropped: the prompt alone filled cutoff_len
    num_fitting: int  # fit whole, EOS included


def load_rows(data_path: str, skip_malformed_lines: bool = False) -> LoadedRows:
    """Rows from a .json list, a .jsonl file, or a dataset id on the Hugging Face hub. A JSONL line that is not
    JSON (a file cut short, say) is an error, or with `skip_malformed_lines` a bad row that validate_rows counts."""
    path = Path(data_path)
    if path.is_file():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is not data
        except UnicodeDecodeError as error:
            raise ValueError(f"--data_path {data_path}: not UTF-8 (byte 0x{raw[error.start]:02x} at offset "
                             f"{error.start}); save it as UTF-8") from None
        if path.suffix == ".jsonl":
            records, numbers = _parse_jsonl(text, data_path, skip_malformed_lines)
        else:
            records = _parse_json(text, data_path)
            numbers = list(range(1, len(records) + 1))
        sha256 = hashlib.sha256(raw).hexdigest()
    elif path.suffix in (".json", ".jsonl") or path.is_dir():
        raise ValueError(f"--data_path {data_path}: no such file; pass an Alpaca-format .json or .jsonl file")
    else:
        records, sha256 = _load_hub_dataset(data_path)
        numbers = list(range(1, len(records) + 1))
    rows, row_numbers = _expand_seed_tasks(records, numbers)
    return LoadedRows(rows=rows, source=data_path, sha256=sha256, row_numbers=row_numbers)


def _parse_json(text: str, source: str) -> list:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of {{instruction, input, output}} rows, got a {type(records).__name__}")
    return records


@dataclass(frozen=True)
class MalformedLine:
    """A JSONL line that is not JSON, kept in place of its row so that validate_rows names and counts it."""

    problem: str


def _parse_jsonl(text: str, source: str, skip_malformed_lines: bool) -> tuple[list, list[int]]:
    records, numbers = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            problem = f"malformed JSON at column {error.colno}: {error.msg}"
            if not skip_malformed_lines:
                raise ValueError(f"{source}: malformed JSON at line {line_number} column {error.colno}: {error.msg}; "
                                 "fix it or pass --skip_bad_rows to drop it") from None
            records.append(MalformedLine(problem))
        numbers.append(line_number)
    return records, numbers


def _load_hub_dataset(dataset_id: str) -> tuple[list, str]:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # offline, unknown id, gated: datasets raises many kinds
        reason = first_line(error)
        raise ValueError(
            f"--data_path {dataset_id!r}: not a local file, and loading it from the Hugging Face hub failed "
            f"({reason}); download it and pass the local .json/.jsonl file"
        ) from None
    return dataset.to_list(), dataset._fingerprint


def _expand_seed_tasks(records: list, numbers: list[int]) -> tuple[list, list[int]]:
    """Self-instruct seed tasks ({instruction, instances: [{input, output}]}) become one row per instance."""
    rows, row_numbers = [], []
    for record, number in zip(records, numbers):
        if isinstance(record, dict) and "output" not in record and isinstance(record.get("instances"), list):
            for instance in record["instances"]:
                instance = instance if isinstance(instance, dict) else {"output": instance}
                rows.append({"instruction": record.get("instruction"), "input": instance.get("input"),
                             "output": instance.get("output")})
                row_numbers.append(number)
        else:
            rows.append(record)
            row_numbers.append(number)
    return rows, row_numbers


def row_problem(row) -> str | None:
    """Why a row cannot be trained on, or None if it is fine."""
    if isinstance(row, MalformedLine):
        return row.problem
    if not isinstance(row, dict):
        return f"expected an object with instruction/input/output, got {type(row).__name__}"
    instruction = row.get("instruction")
    if not isinstance(instruction, str):
        return "'instruction' is missing" if instruction is None else f"'instruction' is not a string ({type(instruction).__name__})"
    if not instruction.strip():
        return "'instruction' is empty"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return f"'input' is not a string ({type(row['input']).__name__})"
    output = row.get("output")
    if not isinstance(output, str):
        return "'output' is missing" if output is None else f"'output' is not a string ({type(output).__name__})"
    return None


def validate_rows(loaded: LoadedRows, skip_bad_rows: bool) -> tuple[list[dict], int]:
    """The good rows and how many bad ones were dropped; bad rows are an error unless skipped."""
    problems = [(number, row_problem(row)) for row, number in zip(loaded.rows, loaded.row_numbers)]
    bad = [(number, problem) for number, problem in problems if problem]
    if bad and not skip_bad_rows:
        listed = "; ".join(f"row {number}: {problem}" for number, problem in bad[:MAX_LISTED_BAD_ROWS])
        more = f" (and {len(bad) - MAX_LISTED_BAD_ROWS} more)" if len(bad) > MAX_LISTED_BAD_ROWS else ""
        raise ValueError(f"{loaded.source}: {len(bad)} bad row(s) of {len(problems)}: {listed}{more}; "
                         "fix them or pass --skip_bad_rows to drop them")
    good = [{"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
            for row, (_, problem) in zip(loaded.rows, problems) if not problem]
    if not good:
        raise ValueError(f"--data_path {loaded.source}: no usable rows; it needs Alpaca rows {{instruction, input, output}}")
    return good, len(bad)


def duplicate_rows(rows: list[dict]) -> int:
    """How many rows repeat an earlier row exactly (instruction, input and output)."""
    return len(rows) - len({_row_key(row) for row in rows})


def _row_key(row: dict) -> tuple:
    return row["instruction"], row["input"], row["output"]


def split_rows(rows: list[dict], val_set_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random validation split of `val_set_size` distinct rows; the rest, in file order, trains.

    The draw is over distinct rows, and every copy of a drawn row is held out with it: a row repeated in the
    data never lands on both sides, where validation would measure memorisation (without repeats this is a
    plain draw of val_set_size rows)."""
    keys = list(dict.fromkeys(_row_key(row) for row in rows))  # distinct rows, first appearance first
    if val_set_size >= len(keys):
        distinct = f" ({len(keys)} distinct)" if len(keys) < len(rows) else ""
        raise ValueError(f"--val_set_size {val_set_size} is not smaller than the {len(rows)} usable rows{distinct}; "
                         "pass a smaller --val_set_size (0 for no validation)")
    held_out = {keys[i] for i in random.Random(seed).sample(range(len(keys)), val_set_size)}
    train = [row for row in rows if _row_key(row) not in held_out]
    validation = [row for row in rows if _row_key(row) in held_out]
    return train, validation


def tokenize_rows(rows: list[dict], tokenizer, template, cutoff_len: int, train_on_inputs: bool) -> TokenizedSet:
    """Token ids and shifted targets for every row; prompt and response tokenized separately, in batches."""
    if not rows:  # e.g. the validation split with val_set_size 0
        return TokenizedSet(examples=[], num_truncated=0, num_without_targets=0, num_fitting=0)
    prompts = [template.prompt(row["instruction"], row["input"]) for row in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([row["output"] for row in rows], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples, num_truncated, num_without_targets = [], 0, 0
    for prompt, response in zip(prompt_ids, response_ids):
        prompt = ([bos] if bos is not None else []) + prompt
        response = response + [eos]  # every example that fits ends with EOS, so the model learns to stop
        input_ids = prompt + response
        # labels[i] is what input position i is trained to be; the prompt is masked unless train_on_inputs.
        labels = input_ids[:] if train_on_inputs else [IGNORE_INDEX] * len(prompt) + response
        truncated = len(input_ids) > cutoff_len
        if truncated:  # the tail is cut, EOS with it: the model must not learn to stop mid-answer
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
            num_truncated += 1
        targets = labels[1:] + [IGNORE_INDEX]  # position i predicts token i+1; the last predicts nothing
        example = Example(input_ids=np.array(input_ids, dtype=np.int32), targets=np.array(targets, dtype=np.int32),
                          truncated=truncated)
        if example.num_targets == 0:
            num_without_targets += 1
            continue
        examples.append(example)
    return TokenizedSet(examples=examples, num_truncated=num_truncated, num_without_targets=num_without_targets,
                        num_fitting=len(rows) - num_truncated)


def tokenize_rows_cached(rows: list[dict], tokenizer, template, cutoff_len: int, train_on_inputs: bool,
                         cache_dir: str | None) -> TokenizedSet:
    """tokenize_rows, remembered on disk under a key of everything that decides the result: the rows
    themselves, the tokenizer's full definition, the template, cutoff_len and train_on_inputs. A second
    run on the same data starts training in seconds. `cache_dir` None or "" turns the cache off."""
    if not cache_dir:
        return tokenize_rows(rows, tokenizer, template, cutoff_len, train_on_inputs)
    key = hashlib.sha256()
    key.update(json.dumps(rows, ensure_ascii=False).encode())
    key.update(tokenizer.backend_tokenizer.to_str().encode())
    key.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, template.to_dict(), cutoff_len,
                           train_on_inputs, CACHE_FORMAT]).encode())
    path = Path(cache_dir).expanduser() / f"{key.hexdigest()}.npz"
    if path.is_file():
        return _read_tokenized(path)
    tokenized = tokenize_rows(rows, tokenizer, template, cutoff_len, train_on_inputs)
    try:
        _write_tokenized(path, tokenized)
    except OSError:  # a read-only or full cache is no reason to stop training
        pass
    return tokenized


CACHE_FORMAT = 1  # bump when the meaning of a cached file changes


def _write_tokenized(path: Path, tokenized: TokenizedSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = [len(e.input_ids) for e in tokenized.examples]
    with staged(path) as staging:  # readers see a whole file or none
        np.savez(staging, lengths=np.array(lengths, dtype=np.int64),
                 input_ids=np.concatenate([e.input_ids for e in tokenized.examples] or [np.zeros(0, np.int32)]),
                 targets=np.concatenate([e.targets for e in tokenized.examples] or [np.zeros(0, np.int32)]),
                 truncated=np.array([e.truncated for e in tokenized.examples], dtype=bool),
                 counts=np.array([tokenized.num_truncated, tokenized.num_without_targets, tokenized.num_fitting]))


def _read_tokenized(path: Path) -> TokenizedSet:
    with np.load(path) as saved:
        ends = np.cumsum(saved["lengths"])
        input_ids, targets = np.split(saved["input_ids"], ends[:-1]), np.split(saved["targets"], ends[:-1])
        examples = [Example(input_ids=i, targets=t, truncated=bool(c))  # views of the two arrays read
                    for i, t, c in zip(input_ids, targets, saved["truncated"])] if len(ends) else []
        num_truncated, num_without_targets, num_fitting = (int(n) for n in saved["counts"])
    return TokenizedSet(examples=examples, num_truncated=num_truncated, num_without_targets=num_without_targets,
                        num_fitting=num_fitting)
