"""Data: rows -> validated rows -> token ids with targets on what the model says and nothing else.

Follow one row: `load_rows` reads `{instruction, input, output}` (or a self-instruct seed task, whose
instances each become a row, or a conversation: conversations.py), `validate_rows` checks its fields,
`tokenize_rows` builds

    input_ids = [BOS] + prompt tokens + response tokens + [EOS]
    targets   = the token that should follow each input position, -100 where no loss is taken

With an Alpaca prompt template, the prompt and the response are tokenized separately and concatenated, so
the boundary between the masked prompt and the trained response cannot shift (tokenizing the joined text and
counting the prompt's tokens, as Stanford's train.py does, is off by one whenever a token spans the boundary).
With a chat template, the whole rendered conversation is tokenized at once (the ids any inference engine makes
of it) and a token is trained when it starts inside an assistant message or its end-of-turn marker
(chat_template.py finds those spans); where a token would straddle a span's edge, the text is tokenized in
pieces split there, so the mask stays exact. Targets are stored already shifted by one, so examples can be laid
end to end (packing) without a label leaking across an example boundary.

Batching (which examples share a forward pass, padded or packed) is batching.py's job.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat_template import ChatTemplate, bos_ids, render_conversation
from .conversations import ALPACA, conversation_of, conversation_problem, row_shape
from .errors import first_line
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
    if row_shape(row) not in (ALPACA, None):
        return conversation_problem(row)
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


def validate_rows(loaded: LoadedRows, skip_bad_rows: bool, check=None) -> tuple[list[dict], int]:
    """The good rows and how many bad ones were dropped; bad rows are an error unless skipped. Rows are Alpaca rows
    {instruction, input, output} or conversations {messages: [{role, content}]}, one shape per file. `check`, given
    a good row, may name one more problem (a chat template refusing it)."""
    _check_one_shape(loaded)
    problems = [(number, row_problem(row) or (check and check(_normalised(row))))
                for row, number in zip(loaded.rows, loaded.row_numbers)]
    bad = [(number, problem) for number, problem in problems if problem]
    if bad and not skip_bad_rows:
        listed = "; ".join(f"row {number}: {problem}" for number, problem in bad[:MAX_LISTED_BAD_ROWS])
        more = f" (and {len(bad) - MAX_LISTED_BAD_ROWS} more)" if len(bad) > MAX_LISTED_BAD_ROWS else ""
        raise ValueError(f"{loaded.source}: {len(bad)} bad row(s) of {len(problems)}: {listed}{more}; "
                         "fix them or pass --skip_bad_rows to drop them")
    good = [_normalised(row) for row, (_, problem) in zip(loaded.rows, problems) if not problem]
    if not good:
        raise ValueError(f"--data_path {loaded.source}: no usable rows; it needs Alpaca rows {{instruction, input, output}} "
                         "or conversations {messages: [{role, content}, ...]}")
    return good, len(bad)


def _normalised(row: dict) -> dict:
    if row_shape(row) == ALPACA:
        return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    return {"messages": conversation_of(row)}


def _check_one_shape(loaded: LoadedRows) -> None:
    """A file that mixes Alpaca rows and conversations is an error naming the first row of each shape."""
    first = {}
    for row, number in zip(loaded.rows, loaded.row_numbers):
        first.setdefault(row_shape(row), number)
    first.pop(None, None)
    if len(first) > 1:
        listed = ", ".join(f"row {number} is {shape}" for shape, number in sorted(first.items(), key=lambda s: s[1]))
        raise ValueError(f"--data_path {loaded.source}: mixes row shapes ({listed}); use one shape per file")


def is_conversation(rows: list[dict]) -> bool:
    return bool(rows) and "messages" in rows[0]


def rendering_problem(template: ChatTemplate, tokenizer):
    """A `check` for validate_rows: why `template` cannot render a row exactly, or None."""
    def problem(row: dict) -> str | None:
        try:
            render_conversation(template, tokenizer, conversation_of(row))
        except ValueError as error:
            return str(error)
        return None
    return problem


def duplicate_rows(rows: list[dict]) -> int:
    """How many rows repeat an earlier row exactly (every field, every message)."""
    return len(rows) - len({_row_key(row) for row in rows})


def _row_key(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True)


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
    """Token ids and shifted targets for every row, in batches. `template` is a PromptTemplate (Alpaca rows) or a
    ChatTemplate (conversations, and Alpaca rows as one-turn conversations)."""
    if not rows:  # e.g. the validation split with val_set_size 0
        return TokenizedSet(examples=[], num_truncated=0, num_without_targets=0, num_fitting=0)
    tokenize = _conversation_tokens if isinstance(template, ChatTemplate) else _prompt_response_tokens
    examples, num_truncated, num_without_targets = [], 0, 0
    for input_ids, trained in tokenize(rows, tokenizer, template):
        # labels[i] is what input position i is trained to be; only the model's own words, unless train_on_inputs
        labels = input_ids[:] if train_on_inputs else [t if keep else IGNORE_INDEX for t, keep in zip(input_ids, trained)]
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


def _prompt_response_tokens(rows: list[dict], tokenizer, template):
    """[BOS] + prompt + response + [EOS] per Alpaca row, prompt and response tokenized separately; the response and
    EOS are trained. Every example that fits ends with EOS, so the model learns to stop."""
    prompts = [template.prompt(row["instruction"], row["input"]) for row in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([row["output"] for row in rows], add_special_tokens=False)["input_ids"]
    for prompt, response in zip(prompt_ids, response_ids):
        prompt = bos_ids(tokenizer) + prompt
        response = response + [tokenizer.eos_token_id]
        yield prompt + response, [False] * len(prompt) + [True] * len(response)


def _conversation_tokens(rows: list[dict], tokenizer, template):
    """[BOS, where the text has none and the model wants one] + the rendered conversation's tokens; a token is
    trained when it starts inside an assistant message or its end-of-turn marker."""
    rendered = [render_conversation(template, tokenizer, conversation_of(row)) for row in rows]
    encoded = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    for conversation, ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        starts, ends = np.array(offsets, dtype=np.int64).reshape(-1, 2).T
        edges = sorted({edge for span in conversation.spans for edge in span})
        straddled = [edge for edge in edges if np.any((starts < edge) & (edge < ends))]
        if straddled:  # a token across a span's edge: tokenize the pieces on either side of each such edge apart
            ids, starts = _tokenize_in_pieces(tokenizer, conversation.text, straddled)
        trained = np.zeros(len(ids), dtype=bool)
        for start, end in conversation.spans:
            trained |= (starts >= start) & (starts < end)
        bos = bos_ids(tokenizer, conversation.text)
        yield bos + list(ids), [False] * len(bos) + trained.tolist()


def _tokenize_in_pieces(tokenizer, text: str, cuts: list[int]) -> tuple[list[int], np.ndarray]:
    """The ids of `text` tokenized piece by piece, cut at `cuts`, and where each token starts in `text`."""
    ids, starts = [], []
    for start, end in zip([0] + cuts, cuts + [len(text)]):
        piece = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        ids += piece["input_ids"]
        starts += [a + start for a, _ in piece["offset_mapping"]]
    return ids, np.array(starts, dtype=np.int64)
