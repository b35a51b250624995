"""The tokenization cache: a second run on the same data reads the examples back; anything that changes them changes
the key."""

import numpy as np
from conftest import REPO

from alpaca_lora import tokenized_cache
from alpaca_lora.chat_template import ChatTemplate
from alpaca_lora.model import load_tokenizer
from alpaca_lora.templates import load_template
from alpaca_lora.tokenized_cache import tokenize_rows_cached


def test_tokenized_data_is_cached_under_everything_that_decides_it(tiny_base, alpaca_rows, tmp_path, monkeypatch):
    tokenizer, template = load_tokenizer(str(tiny_base)), load_template("alpaca")
    cache = str(tmp_path / "cache")
    first = tokenize_rows_cached(alpaca_rows, tokenizer, template, 192, False, cache)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_tokenizing(*args):
        raise AssertionError("tokenized again despite the cache")
    monkeypatch.setattr(tokenized_cache, "tokenize_rows", no_tokenizing)
    again = tokenize_rows_cached(alpaca_rows, tokenizer, template, 192, False, cache)
    def contents(tokenized):
        return ([(e.input_ids.tolist(), e.targets.tolist(), e.truncated) for e in tokenized.examples],
                tokenized.num_truncated, tokenized.num_without_targets, tokenized.num_fitting)
    assert contents(again) == contents(first)  # examples, truncation flags and counts all come back
    assert first.num_without_targets and {e.truncated for e in first.examples} == {True, False}  # 38 examples
    assert again.examples[0].input_ids.dtype == np.int32  # compact: 4 bytes a token, not a Python int's 36
    monkeypatch.undo()
    chat = ChatTemplate("alpaca", (REPO / "templates" / "alpaca.jinja").read_text())
    for changed in (dict(cutoff_len=256), dict(train_on_inputs=True), dict(template=load_template("alpaca_short")),
                    dict(rows=alpaca_rows[:-1]), dict(template=chat)):
        arguments = dict(rows=alpaca_rows, tokenizer=tokenizer, template=template, cutoff_len=192, train_on_inputs=False)
        tokenize_rows_cached(**{**arguments, **changed}, cache_dir=cache)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 6
    uncached = tokenize_rows_cached(alpaca_rows, tokenizer, template, 192, False, cache_dir="")  # off: no file
    assert contents(uncached) == contents(first)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 6
