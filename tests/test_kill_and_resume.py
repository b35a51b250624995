"""kill -9 at random moments of a run that checkpoints every step: each restart resumes exactly from the newest
complete checkpoint, and the run's losses come out bit for bit as an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO


def _flags(tiny_base, alpaca_file, out):
    return [sys.executable, str(REPO / "finetune.py"), "--base_model", str(tiny_base), "--data_path", str(alpaca_file),
            "--output_dir", str(out), "--batch_size", "8", "--micro_batch_size", "4", "--num_epochs", "25",
            "--val_set_size", "8", "--cutoff_len", "512", "--learning_rate", "1e-2", "--warmup_steps", "1",
            "--lora_dropout", "0.1", "--save_steps", "1", "--save_total_limit", "2", "--eval_steps", "100",
            "--logging_steps", "1", "--bf16", "False", "--load_8bit", "False"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _newest_checkpoint(out):
    complete = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


@pytest.mark.slow
def test_twenty_kills_at_random_moments_never_lose_exactness(tiny_base, alpaca_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    reference = subprocess.run(_flags(tiny_base, alpaca_file, tmp_path / "whole"), env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = _losses(tmp_path / "whole")
    assert len(expected) == 125

    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while kills < 20 and not (out / "adapter_model.safetensors").exists():
        newest = _newest_checkpoint(out) if out.exists() else None
        command = _flags(tiny_base, alpaca_file, out) + (["--resume_from_checkpoint", str(newest)] if newest else [])
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(2.0, 6.5))  # in the imports, loading, a step, a checkpoint: 125 steps take ~15 s
        process.send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate()
        kills += process.returncode == -signal.SIGKILL
        if newest:  # never a silent fresh start: it says where it resumed, when it got that far
            assert "starting from" not in stdout
            assert "resumed from" not in stdout or f"resumed from {newest} at step {newest.name.split('-')[1]}" in stdout
    if not (out / "adapter_model.safetensors").exists():  # the last kill came before the end: finish the run
        newest = _newest_checkpoint(out)
        finishing = subprocess.run(_flags(tiny_base, alpaca_file, out)
                                   + (["--resume_from_checkpoint", str(newest)] if newest else []),
                                   env=env, capture_output=True, text=True, timeout=600)
        assert finishing.returncode == 0, finishing.stderr[-2000:]
    assert kills == 20  # every kill landed while the run was alive
    assert _losses(out) == expected  # bit for bit, however often it was killed
