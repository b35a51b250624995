"""files.py: a staged write leaves the old file or folder or the new one, never half of one; JSONL resumes."""

import json

import pytest

from alpaca_lora.files import append_jsonl, resume_jsonl, staged, staging_path, write_text_atomically


def test_a_staged_file_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with staged(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".state.") and staging.suffix == ".json"
        staging.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_staged_folder_replaces_the_old_folder(tmp_path):
    target = tmp_path / "export"
    (target / "stale").mkdir(parents=True)
    with staged(target) as staging:
        staging.mkdir()
        (staging / "model.safetensors").write_text("weights")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_error_while_staging_leaves_the_old_target_and_no_staging(tmp_path, kind):
    target = tmp_path / "out"
    target.write_text("old") if kind == "file" else (target / "old").mkdir(parents=True)
    with pytest.raises(ValueError, match="verification failed"):
        with staged(target) as staging:
            if kind == "file":
                staging.write_text("half")
            else:
                (staging / "half").mkdir(parents=True)
            raise ValueError("verification failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target.read_text() == "old") if kind == "file" else [p.name for p in target.iterdir()] == ["old"]


def test_a_staging_left_by_a_killed_run_of_this_process_id_is_cleared(tmp_path):
    target = tmp_path / "report.md"
    staging_path(target).write_text("left by a kill")
    write_text_atomically(target, "whole")
    assert target.read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_resume_drops_a_line_cut_by_a_kill_and_skips_junk(tmp_path):
    path = tmp_path / "answers.jsonl"
    append_jsonl(path, [{"row": 1}, {"row": 2}])
    with open(path, "a") as out:
        out.write("not json\n" + json.dumps({"row": 3})[:6])  # a junk line, then half a record
    assert resume_jsonl(path) == [{"row": 1}, {"row": 2}]
    assert path.read_text() == '{"row": 1}\n{"row": 2}\nnot json\n'  # the half line is gone from the file
    append_jsonl(path, [{"row": 3}])
    assert resume_jsonl(path) == [{"row": 1}, {"row": 2}, {"row": 3}]
    assert resume_jsonl(tmp_path / "absent.jsonl") == []
