"""adapter_folder.py: the one reader and writer of an adapter folder's description."""

import json
import shutil
from pathlib import Path

import pytest

from alpaca_lora.adapter_folder import SUMMARY_FILE, TrainingSummary, describe_adapter, model_card, save_adapter


def test_the_summary_reads_back_as_written(tiny_adapter, tiny_base):
    saved = json.loads((tiny_adapter / SUMMARY_FILE).read_text())
    adapter = describe_adapter(str(tiny_adapter))
    assert adapter.summary.to_dict() == saved
    assert (adapter.summary.data.train_rows, adapter.summary.arguments["max_steps"]) == (48, 2)
    assert (tiny_adapter / "README.md").read_text() == model_card(adapter.summary)
    assert "| `lora_r` | `8` |" in model_card(adapter.summary)


def test_an_adapter_made_elsewhere_names_its_base_and_nothing_more(tiny_adapter, tmp_path):
    folder = tmp_path / "peft-only"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tiny_adapter / name, folder / name)
    adapter = describe_adapter(str(folder))
    assert (adapter.base_model, adapter.prompt_template, adapter.summary) == \
        (json.loads((tiny_adapter / "adapter_config.json").read_text())["base_model_name_or_path"], None, None)


@pytest.mark.parametrize("content, message", [
    ("{", r"training_summary.json cannot be read \(Expecting property name"),
    ('{"base_model": "x"}', "training_summary.json is not a training summary this version reads"),
])
def test_a_damaged_summary_is_one_error_naming_the_file(tiny_adapter, tmp_path, content, message):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_adapter, folder)
    (folder / SUMMARY_FILE).write_text(content)
    with pytest.raises(ValueError, match=rf"--lora_weights {folder}.*{message}"):
        describe_adapter(str(folder))
    with pytest.raises(ValueError, match="no adapter_config.json there"):
        describe_adapter(str(tmp_path))


def test_a_save_that_fails_leaves_no_adapter_weights(tiny_adapter, tmp_path):
    summary = TrainingSummary.from_dict(json.loads((tiny_adapter / SUMMARY_FILE).read_text()))

    class Tokenizer:
        bos_token_id, pad_token_id = 1, 0

        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    class DiskFull:
        def save_pretrained(self, folder):
            (Path(folder) / "adapter_config.json").write_text("{}")
            raise OSError(28, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="No space left"):
        save_adapter(out, DiskFull(), Tokenizer(), summary, [{"instruction": "a", "input": "", "output": "b"}], [2])
    # the summary and card were written, but without the weights the folder does not pass for a finished adapter
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", SUMMARY_FILE, "tokenizer.json",
                                                             "generation_config.json", "validation_rows.json"])
