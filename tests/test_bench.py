"""The training benchmark measures what it says: each worker reports its own peak memory and real throughput."""

import json

from conftest import REPO, run_script


def test_a_worker_reports_its_own_peak_memory_not_its_launchers(tiny_base, alpaca_file, tmp_path):
    # getrusage's peak survives fork and exec: a worker launched by a process holding 1.5 GB would report 1.5 GB
    ballast = bytearray(1536 * 2 ** 20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page, so that it is resident
    completed = run_script(REPO / "bench" / "train_throughput.py", "--worker", "--path", "ours", "--lora", "qv-r8",
                           "--cutoff", "256", "--dtype", "fp32", "--base", tiny_base, "--data", alpaca_file,
                           "--steps", "2", "--batch_size", "8", "--val_rows", "8", "--checkpointing", "off",
                           "--output_dir", tmp_path / "run")
    del ballast
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(next(l for l in completed.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert 0 < result["peak_above_libraries_mb"] < result["peak_rss_mb"] < 1024  # a tiny model: well under 1 GB
    assert result["real_tokens_per_second"] > 0 and len(result["train_losses"]) == 2
    assert 0 <= result["padding_fraction"] < 0.2  # packed
