"""The training benchmark measures what it says: each worker reports its own peak memory and real throughput."""

import importlib.util
import json

import pytest

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


def _bench_module():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(micro_batch, standard_tokens_per_second, ours_tokens_per_second):
    def path(tokens_per_second):
        return {"real_tokens_per_second": tokens_per_second, "target_tokens_per_second": tokens_per_second / 2,
                "performed_flops_per_real_token": 0.0, "peak_rss_mb": 1000.0, "peak_above_libraries_mb": 600.0}
    return {"lora": "qv-r8", "cutoff": 256, "dtype": "bf16", "gradient_checkpointing": "off", "memory": "default",
            "micro_batch": micro_batch, "standard": path(standard_tokens_per_second), "ours": path(ours_tokens_per_second)}


def test_best_settings_pick_each_paths_fastest_row_and_bound_the_speedup():
    bench = _bench_module()
    rows = [_row(4, standard_tokens_per_second=700, ours_tokens_per_second=1400),
            _row(1, standard_tokens_per_second=1000, ours_tokens_per_second=1300)]
    best = bench.best_settings_each(rows, {"fp32": 200e9, "bf16": 400e9})["qv-r8 cutoff 256"]
    assert (best["standard_micro_batch"], best["ours_micro_batch"]) == (1, 4)
    assert best["speedup"] == pytest.approx(1.4)
    # useful FLOPs per real token for the benchmark's model at cutoff 256, half the tokens with a target:
    # decoder 4 x 25,296,896 parameters + attention 8 layers x 6 matmuls x 2 x 512 x 75, head 4 x 512 x 32,000 at
    # half the tokens
    useful = 4 * 25_296_896 + 8 * 6 * 2 * 512 * 75 + 0.5 * 4 * 512 * 32_000
    assert best["speedup_ceiling"] == pytest.approx(400e9 / useful / 1000)  # 2.91x: the bf16 peak, all useful work


def test_trl_trains_the_same_examples_as_ours(tiny_base, alpaca_file, tmp_path):
    """modern_shapes.py's TRL path gets ours' tokenized examples: on the tiny base, after the same 2 steps (whose
    updates are too small to move a random model's held-out loss), both report the same held-out loss per target
    token (a different split, or loss on the prompt too, would not agree to 1e-5)."""
    pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[bench]'")
    common = ["--base", tiny_base, "--data", alpaca_file, "--steps", "2", "--batch_size", "8", "--val_rows", "8",
              "--cutoff", "256", "--micro_batch", "4", "--dtype", "fp32"]
    results = {}
    for path, script, extra in (("trl", "modern_shapes.py", []),
                                ("ours", "train_throughput.py", ["--path", "ours", "--lora", "qv-r8",
                                                                 "--checkpointing", "off"])):
        completed = run_script(REPO / "bench" / script, "--worker", *extra, *common, "--output_dir", tmp_path / path)
        assert completed.returncode == 0, completed.stderr[-2000:]
        results[path] = json.loads(next(l for l in completed.stdout.splitlines()
                                        if l.startswith("RESULT "))[len("RESULT "):])
    assert results["trl"]["eval_loss"] == pytest.approx(results["ours"]["eval_loss"], rel=1e-5)
    assert len(results["trl"]["train_losses"]) == 2 and results["trl"]["real_tokens_per_second"] > 0


def test_the_useful_work_of_a_grouped_query_model_and_of_the_32k_llama_shape():
    """MFU's numerator, one count for both benchmarks: for a Qwen3-0.6B-shaped config q and o at heads x head_dim,
    k and v at the KV heads'."""
    throughput = _bench_module()
    qwen3 = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                 num_hidden_layers=8, vocab_size=151_936)
    flops = throughput.useful_flops_per_second({"real_tokens_per_second": 100, "target_tokens_per_second": 50},
                                               256, qwen3)
    per_layer = 1024 * 128 * (2 * 16 + 2 * 8) + 3 * 1024 * 3072  # 15,728,640 parameters
    attention = 6 * 2 * 16 * 128 * 150 / 2  # six [query x context] matmuls per head over 75 positions on average
    assert flops == pytest.approx(100 * 8 * (4 * per_layer + attention) + 50 * 4 * 1024 * 151_936)
    # the 32K LLaMA shape: as many KV heads as heads, head_dim hidden / heads, LLaMA's vocabulary
    decoder, head = throughput.flops_per_position(256, throughput.SHAPE)
    assert (decoder, head) == (8 * (4 * (4 * 512 * 512 + 3 * 512 * 1376) + 6 * 2 * 512 * 75), 4 * 512 * 32000)
