"""The tokenization cache: tokenize_rows' result kept on disk, keyed by everything that decides it, so that a second
run on the same data starts training in seconds."""

import hashlib
import json
from pathlib import Path

import numpy as np

from .data import Example, TokenizedSet, tokenize_rows
from .files import staged


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
    key.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, type(template).__name__, template.to_dict(),
                           cutoff_len, train_on_inputs, CACHE_FORMAT]).encode())
    path = Path(cache_dir).expanduser() / f"{key.hexdigest()}.npz"
    if path.is_file():
        return _read_tokenized(path)
    tokenized = tokenize_rows(rows, tokenizer, template, cutoff_len, train_on_inputs)
    try:
        _write_tokenized(path, tokenized)
    except OSError:  # a read-only or full cache is no reason to stop training
        pass
    return tokenized


CACHE_FORMAT = 2  # bump when the meaning of a cached file changes


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
