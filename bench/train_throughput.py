"""Training throughput: the standard path against ours, same model, data, hyperparameters and steps.

    python bench/train_throughput.py [--steps 8] [--repeats 2] [--batch_size 16] [--quick]
    python bench/train_throughput.py --gpu [--only 8bit,4bit,bf16,compile]   # 7B-shaped model on a CUDA GPU

The standard path is what alpaca-lora (and most HF Trainer + peft scripts) do: each example padded to the
longest of its micro-batch (rounded up to a multiple of 8), full-vocabulary logits at every position, peft's
LoRA layer as it comes (its input copied to fp32, torch's dropout). Ours: whole examples packed end to end (no
padding, attention kept inside each example), the LM head and cross-entropy only at response positions, and
--fast_lora_dropout. Both train the same examples in every step.

Micro-batch 4 (alpaca-lora's) throughout; in bf16 also 1 and 2 for both paths, for each path's best settings: on
a CPU a micro-batch of one example has no padding and still runs its matmuls near full speed, which makes it the
standard path's fastest setting here.

Each configuration runs in a fresh process (so peak resident memory is its own), standard and ours
alternating, `--repeats` times each; the fastest run of each path counts (interference from other work on
the machine only slows a run down), and every run's tokens per second is kept in the JSON. The model is LLaMA-shaped (hidden 512, 8 layers, 8 heads, MLP 1376) with the real 32,000-token
LLaMA vocabulary and random weights, stored in fp16 like LLaMA-7B's checkpoints; the data are real Alpaca rows. Tokens per second leave out the first
step (allocation and kernel warm-up). MFU is useful model FLOPs per second over the peak a large matmul
reaches here in the same dtype; useful FLOPs per real token = 4 x decoder parameters (forward, and backward
to the activations: the base is frozen) + attention + 4 x hidden x vocab for each token that has a target
(the LM head that a loss needs). The work ratio is the FLOPs per real token the standard path performs
(padding, logits at every position) over ours: the speedup equal efficiency would give. Live-memory rows (bf16,
micro-batch 4) run with glibc's mmap threshold fixed at 128 KB so that peak RSS follows live tensors rather than
what the allocator kept; with q,v r=8 also with gradient checkpointing (where the logits are most of what is left).
Prints a table and writes bench/results/train_throughput.json.

--gpu: a 7B-shaped model (hidden 4096, 32 layers, MLP 11008, random bf16 weights) with 8-bit and 4-bit base
weights, cutoff 512, micro-batch 4, LoRA r=8 on q,v: peak GPU memory (allocated and reserved by PyTorch's
allocator; the CUDA context adds a few hundred MB outside both) and tokens per second, the standard path as
alpaca-lora runs it (gradient checkpointing on, as its peft preparation does) against ours with and without
checkpointing; also both paths with bf16 weights. Writes bench/results/train_throughput_gpu-<weights>.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
RESULTS = REPO / "bench" / "results"
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376)
SHAPE_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008)
LORA = {"qv-r8": dict(lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"]),
        "all-r16": dict(lora_r=16, lora_alpha=32, lora_target_modules="all-linear")}


def data_file() -> Path:
    cleaned = SHARED / "data" / "alpaca_sample_cleaned.json"
    if cleaned.exists():
        return cleaned
    print(f"note: {cleaned} is absent; using data/seed_tasks.jsonl (shorter than real Alpaca rows)")
    return REPO / "data" / "seed_tasks.jsonl"


def peak_matmul_flops(dtype_name: str) -> float:
    """The physical limit here: FLOP/s of a large square matmul in the given dtype, best of several."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048 ** 3 / (time.perf_counter() - started))
    return best


def worker(args) -> None:
    """One training run in this process; prints one JSON line of measurements."""
    import peft  # noqa: F401  (imported before the baseline reading, as train() would import it)
    import transformers  # noqa: F401

    from alpaca_lora.config import TrainConfig
    from alpaca_lora.loss import padded_loss, response_only_loss
    from alpaca_lora.train import train

    libraries_rss = _memory_mb("VmRSS")  # interpreter + torch + transformers
    # the peak from here on; getrusage's peak will not do: it survives fork and exec, so a worker's would start
    # at whatever the launching process had reached (it builds the model)
    Path("/proc/self/clear_refs").write_text("5")

    config = TrainConfig(
        base_model=args.base, data_path=args.data, output_dir=args.output_dir, overwrite_output_dir=True,  # scratch
        batch_size=args.batch_size, micro_batch_size=args.micro_batch, num_epochs=1, max_steps=args.steps,
        cutoff_len=args.cutoff, chat_template=args.chat_template or "",
        val_set_size=args.val_rows,
        learning_rate=3e-4, warmup_steps=0, lora_dropout=0.05, logging_steps=1000, eval_steps=10_000,
        save_steps=10_000, seed=0, bf16={"bf16": True, "fp32": False}.get(args.dtype), packing=args.path == "ours",
        # the standard path: peft's LoRA layer and transformers' norms and MLPs as they come
        fast_lora_dropout=args.path == "ours", lean_activations=args.path == "ours",
        load_8bit=args.dtype == "8bit", load_4bit=args.dtype == "4bit",
        gradient_checkpointing={"on": True, "off": False}.get(args.checkpointing), torch_compile=args.torch_compile,
        **LORA[args.lora])
    result = train(config, loss_sum=response_only_loss if args.path == "ours" else padded_loss)
    timed = result.history[1:]  # the first step pays for allocation and kernel selection
    seconds = sum(r["seconds"] for r in timed)
    memory = result.summary.gpu_memory_mb
    gpu = {"gpu_after_loading_mb": memory["after_loading"], "gpu_peak_loading_mb": memory["peak_while_loading"],
           "gpu_peak_allocated_mb": max(memory["peak_while_loading"], memory["peak_while_training"]),
           "gpu_peak_training_mb": memory["peak_while_training"],
           "gpu_peak_reserved_mb": memory["peak_reserved"]} if memory else {}
    print("RESULT " + json.dumps({**gpu,
        "real_tokens_per_second": sum(r["real_tokens"] for r in timed) / seconds,
        "target_tokens_per_second": sum(r["target_tokens"] for r in timed) / seconds,
        "seconds_per_step": seconds / len(timed),
        "peak_rss_mb": _memory_mb("VmHWM"),
        "peak_above_libraries_mb": _memory_mb("VmHWM") - libraries_rss,
        "padding_fraction": result.summary.padding_fraction,
        "eval_loss": result.summary.final_validation_loss,
        "train_losses": [r["loss"] for r in result.history],
    }))


def _memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since start or the last reset) of this process (Linux)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def flops_per_position(cutoff: int, shape: dict) -> tuple[float, float]:
    """(decoder work per position, LM-head work per position that computes logits), forward and backward to the
    activations (the base is frozen): 4 x each weight's parameters, q and o at heads x head_dim, k and v at the KV
    heads' (a model's config.json or SHAPE; vocabulary 32,000 where the shape has none: LLaMA's), and attention's
    six matmuls (QK^T and AV forward, four in backward) over half a typical example."""
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    kv_heads, head_dim = shape.get("num_key_value_heads", heads), shape.get("head_dim") or h // heads
    per_layer = h * head_dim * (2 * heads + 2 * kv_heads) + 3 * h * shape["intermediate_size"]
    attention = 6 * 2 * heads * head_dim * min(cutoff, 150) / 2
    return shape["num_hidden_layers"] * (4 * per_layer + attention), 4 * h * shape.get("vocab_size", 32000)


def useful_flops_per_second(measured: dict, cutoff: int, shape: dict = SHAPE) -> float:
    """The decoder at every real token and the LM head at every target token: the work any implementation
    of this training step must do."""
    decoder, head = flops_per_position(cutoff, shape)
    return measured["real_tokens_per_second"] * decoder + measured["target_tokens_per_second"] * head


def performed_flops_per_real_token(measured: dict, cutoff: int, path: str) -> float:
    """The work a path does per real token: the decoder also at padding, the head at every position it
    computes logits for (all of them on the standard path, target positions on ours)."""
    decoder, head = flops_per_position(cutoff, SHAPE)
    computed_per_real = 1 / (1 - measured["padding_fraction"])
    targets_per_real = measured["target_tokens_per_second"] / measured["real_tokens_per_second"]
    return decoder * computed_per_real + head * (computed_per_real if path == "standard" else targets_per_real)


def run(args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    from alpaca_lora.bench import random_llama

    # stored in fp16, as LLaMA-7B's Hugging Face checkpoints are: each path casts it to the dtype it trains in
    base = random_llama(RESULTS / "llama-shaped-base-fp16", SHAPE, SHARED / "models" / "llama-tokenizer" / "tokenizer.model",
                        dtype="float16")
    data = data_file()
    peaks = {dtype: peak_matmul_flops(dtype) for dtype in ("fp32", "bf16")}
    print(f"peak matmul: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    # the default precision follows the CPU's flags (fast_bf16_available); here is whether the flags told the truth
    import torch
    from alpaca_lora.model import fast_bf16_available
    chosen = "bf16" if fast_bf16_available(torch.device("cpu")) else "fp32"
    print(f"default precision from the CPU's flags: {chosen}; faster here: {max(peaks, key=peaks.get)}")
    # (LoRA, cutoff, dtype, gradient checkpointing, memory): every setting at full speed with the default
    # allocator; then live memory: glibc keeps freed blocks, so peak RSS mostly shows what the allocator
    # retained; with a fixed 128 KB mmap threshold every tensor but the smallest goes back to the system when
    # freed and peak RSS follows the live tensors (slower, so those runs' speeds are not comparable with the
    # others). Not 1 MB: an activation just under it (e.g. [4, 248, 512] in bf16) then lands on the heap, and
    # the heap keeps its pages after it is freed.
    # the last element is the micro-batch: 1 and 2 too for each path's best settings (see the docstring)
    configs = [(lora, cutoff, dtype, "off", "default", 4) for lora in LORA for cutoff in (256, 512)
               for dtype in ("fp32", "bf16")]
    configs += [(lora, cutoff, "bf16", "off", "default", micro) for lora in LORA for cutoff in (256, 512)
                for micro in (1, 2)]
    configs += [("qv-r8", 1024, "bf16", "off", "default", 4)]
    configs += [(lora, cutoff, "bf16", checkpointing, "live", 4) for lora in LORA for cutoff in (256, 512)
                for checkpointing in (("off", "on") if lora == "qv-r8" else ("off",))]
    if args.quick:
        configs = [("qv-r8", 256, "bf16", "off", "default", 4)]
    rows = []
    for lora, cutoff, dtype, checkpointing, memory, micro_batch in configs:
        row = {"lora": lora, "cutoff": cutoff, "dtype": dtype, "gradient_checkpointing": checkpointing, "memory": memory,
               "micro_batch": micro_batch}
        runs = {"standard": [], "ours": []}
        for _ in range(args.repeats):
            for path in ("standard", "ours"):  # alternating, one fresh process each
                measured = launch_worker(args, path=path, lora=lora, cutoff=cutoff, dtype=dtype, base=base, data=data,
                                         checkpointing=checkpointing, live_memory=memory == "live",
                                         micro_batch=micro_batch)
                runs[path].append(measured)
                print(f"  {lora} cutoff {cutoff} {dtype} checkpointing {checkpointing} {memory} memory "
                      f"micro-batch {micro_batch} {path}: "
                      f"{measured['real_tokens_per_second']:.0f} tokens/s, {measured['peak_rss_mb']:.0f} MB, "
                      f"eval loss {measured['eval_loss']:.5f}", flush=True)
        for path in ("standard", "ours"):
            # the fastest of the repeats: on a shared machine, interference only ever slows a run down
            measured = max(runs[path], key=lambda m: m["real_tokens_per_second"])
            measured["tokens_per_second_of_each_run"] = [m["real_tokens_per_second"] for m in runs[path]]
            measured["mfu"] = useful_flops_per_second(measured, cutoff) / peaks[dtype]
            measured["performed_flops_per_real_token"] = performed_flops_per_real_token(measured, cutoff, path)
            row[path] = measured
        row["speedup"] = row["ours"]["real_tokens_per_second"] / row["standard"]["real_tokens_per_second"]
        row["work_ratio"] = (row["standard"]["performed_flops_per_real_token"]
                             / row["ours"]["performed_flops_per_real_token"])
        row["memory_ratio"] = row["ours"]["peak_rss_mb"] / row["standard"]["peak_rss_mb"]
        row["memory_ratio_above_libraries"] = (row["ours"]["peak_above_libraries_mb"]
                                               / row["standard"]["peak_above_libraries_mb"])
        row["eval_loss_relative_difference"] = abs(row["ours"]["eval_loss"] / row["standard"]["eval_loss"] - 1)
        rows.append(row)
    best = best_settings_each(rows, peaks)
    report = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
              "data": str(data), "peak_flops": peaks, "rows": rows, "best_settings_each": best}
    (RESULTS / "train_throughput.json").write_text(json.dumps(report, indent=2))
    print(_table(rows, best))


def best_settings_each(rows: list[dict], peaks: dict) -> dict:
    """For each LoRA and cutoff, each path at its own fastest dtype and micro-batch (full-speed rows only), and
    the ceiling: the speedup over the standard path's measured rate of a run that did only the useful work (see
    useful_flops_per_second) at the machine's matmul peak. Where the ceiling is under a target, a faster
    implementation of the same work cannot reach the target on this machine."""
    best = {}
    full_speed = [r for r in rows if r["gradient_checkpointing"] == "off" and r["memory"] == "default"]
    for lora, cutoff in {(r["lora"], r["cutoff"]) for r in full_speed}:
        group = [r for r in full_speed if (r["lora"], r["cutoff"]) == (lora, cutoff)]
        standard = max(group, key=lambda r: r["standard"]["real_tokens_per_second"])
        ours = max(group, key=lambda r: r["ours"]["real_tokens_per_second"])
        useful_per_real_token = useful_flops_per_second(ours["ours"], cutoff) / ours["ours"]["real_tokens_per_second"]
        at_peak = max(peaks.values()) / useful_per_real_token  # real tokens/s
        best[f"{lora} cutoff {cutoff}"] = {
            "standard_dtype": standard["dtype"], "ours_dtype": ours["dtype"],
            "standard_micro_batch": standard["micro_batch"], "ours_micro_batch": ours["micro_batch"],
            "speedup": ours["ours"]["real_tokens_per_second"] / standard["standard"]["real_tokens_per_second"],
            "speedup_ceiling": at_peak / standard["standard"]["real_tokens_per_second"],
            "memory_ratio": ours["ours"]["peak_rss_mb"] / standard["standard"]["peak_rss_mb"],
            "memory_ratio_above_libraries": (ours["ours"]["peak_above_libraries_mb"]
                                             / standard["standard"]["peak_above_libraries_mb"])}
    return best


def launch_worker(args, *, path, lora, cutoff, dtype, base, data, checkpointing="auto", live_memory=False,
                  compiled=False, micro_batch=4) -> dict:
    """One training run in a fresh process (so its peak memory is its own); its measurements."""
    command = [sys.executable, __file__, "--worker", "--path", path, "--lora", lora, "--cutoff", str(cutoff),
               "--dtype", dtype, "--base", str(base), "--data", str(data), "--steps", str(args.steps),
               "--batch_size", str(args.batch_size), "--val_rows", str(args.val_rows), "--checkpointing", checkpointing,
               "--micro_batch", str(micro_batch), *(["--torch_compile"] if compiled else []),
               "--output_dir", str(RESULTS / "runs" / f"{lora}-{cutoff}-{dtype}-{path}-{checkpointing}"
                                                       f"-{live_memory}-{compiled}-{micro_batch}")]
    result = run_worker(command, live_memory)
    if "failed" in result:
        sys.exit(f"bench: the {path} run of {lora} cutoff {cutoff} {dtype} failed:\n{result['failed']}")
    return result


def run_worker(command: list[str], live_memory: bool) -> dict:
    """A worker's RESULT line, or {"failed": the end of its stderr}. live_memory: glibc's mmap threshold fixed at
    128 KB, so that peak RSS follows live tensors rather than what the allocator kept."""
    env = {**os.environ, "WANDB_MODE": "disabled", **({"MALLOC_MMAP_THRESHOLD_": str(2 ** 17)} if live_memory else {})}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [l for l in completed.stdout.splitlines() if l.startswith("RESULT ")]
    if completed.returncode or not lines:
        return {"failed": completed.stderr[-3000:].strip() or "no result"}
    return json.loads(lines[-1][len("RESULT "):])


# weights -> (base weights, path, gradient checkpointing, --torch_compile): the standard path as alpaca-lora
# runs it, ours with and without checkpointing; "compile": ours in bf16 eager, then compiled
GPU_RUNS = {"8bit": [("8bit", "standard", "on", False), ("8bit", "ours", "on", False), ("8bit", "ours", "off", False)],
            "4bit": [("4bit", "standard", "on", False), ("4bit", "ours", "on", False), ("4bit", "ours", "off", False)],
            "bf16": [("bf16", "standard", "off", False), ("bf16", "ours", "off", False)],
            "compile": [("bf16", "ours", "off", False), ("bf16", "ours", "off", True)]}
GPU_GOALS_MB = {"8bit": 12 * 1024, "4bit": 8 * 1024}


def run_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench: --gpu needs a CUDA GPU")
    RESULTS.mkdir(parents=True, exist_ok=True)
    from alpaca_lora.bench import random_llama

    started = time.time()
    base = random_llama(RESULTS / "llama-7b-shaped-base", SHAPE_7B,
                        SHARED / "models" / "llama-tokenizer" / "tokenizer.model", dtype="bfloat16")
    print(f"7B-shaped base ready in {time.time() - started:.0f} s", flush=True)
    data = data_file()
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    peak = 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1000)
    del a, b
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    report = {"machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "shape": SHAPE_7B, "lora": LORA["qv-r8"], "cutoff_len": 512,
              "micro_batch_size": 4, "steps": args.steps, "batch_size": args.batch_size, "data": str(data),
              "bf16_matmul_flops": peak, "rows": rows}
    for group in args.only.split(","):
        for weights, path, checkpointing, compiled in GPU_RUNS[group]:
            started = time.time()
            measured = launch_worker(args, path=path, lora="qv-r8", cutoff=512, dtype=weights, base=base, data=data,
                                     checkpointing=checkpointing, compiled=compiled)
            measured.update(weights=weights + (" compiled" if compiled else ""), path=path,
                            gradient_checkpointing=checkpointing,
                            mfu=useful_flops_per_second(measured, 512, SHAPE_7B) / peak,
                            wall_seconds=time.time() - started)
            rows.append(measured)
            (RESULTS / f"train_throughput_gpu-{args.only.replace(',', '-')}.json").write_text(json.dumps(report, indent=2))  # after every run
            print(f"  {weights} {path} checkpointing {checkpointing}: {measured['real_tokens_per_second']:.0f} tokens/s, "
                  f"{measured['gpu_peak_reserved_mb']:.0f} MB reserved, eval loss {measured['eval_loss']:.5f} "
                  f"({measured['wall_seconds']:.0f} s)", flush=True)
    print(_gpu_table(rows))


def _gpu_table(rows) -> str:
    lines = ["| weights | path | grad. checkpointing | real tokens/s | s/step | after loading MB | peak loading MB | "
             "peak training MB | peak reserved MB | goal | padding | MFU (bf16 peak) | eval loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        goal = GPU_GOALS_MB.get(r["weights"])
        verdict = "" if goal is None else f"< {goal // 1024} GB: {'met' if r['gpu_peak_allocated_mb'] < goal else 'NOT met'}"
        lines.append(f"| {r['weights']} | {r['path']} | {r['gradient_checkpointing']} | {r['real_tokens_per_second']:.0f} | "
                     f"{r['seconds_per_step']:.2f} | {r['gpu_after_loading_mb']:.0f} | {r['gpu_peak_loading_mb']:.0f} | "
                     f"{r['gpu_peak_training_mb']:.0f} | {r['gpu_peak_reserved_mb']:.0f} | {verdict} | "
                     f"{r['padding_fraction']:.1%} | {r['mfu']:.1%} | {r['eval_loss']:.5f} |")
    return "\n".join(lines)


def _machine() -> str:
    import platform

    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _table(rows, best) -> str:
    lines = ["| LoRA | cutoff | dtype | micro-batch | grad. ckpt | memory | path | real tokens/s | s/step | peak RSS MB | "
             "above libraries MB | padding | MFU | eval loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for path in ("standard", "ours"):
            m = r[path]
            lines.append(f"| {r['lora']} | {r['cutoff']} | {r['dtype']} | {r['micro_batch']} | {r['gradient_checkpointing']} | "
                         f"{r['memory']} | {path} | "
                         f"{m['real_tokens_per_second']:.0f} | {m['seconds_per_step']:.2f} | {m['peak_rss_mb']:.0f} | "
                         f"{m['peak_above_libraries_mb']:.0f} | {m['padding_fraction']:.1%} | {m['mfu']:.1%} | "
                         f"{m['eval_loss']:.5f} |")
    lines += ["", "Same settings, ours / standard (work ratio: FLOPs per real token the standard path does over ours, "
              "the speedup at equal efficiency):", "",
              "| LoRA | cutoff | dtype | micro-batch | grad. ckpt | memory | tokens/s | work ratio | peak RSS | "
              "above libraries | eval loss rel. diff |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['lora']} | {r['cutoff']} | {r['dtype']} | {r['micro_batch']} | {r['gradient_checkpointing']} | {r['memory']} | "
              f"{r['speedup']:.2f}x | "
              f"{r['work_ratio']:.2f}x | {r['memory_ratio']:.2f} | {r['memory_ratio_above_libraries']:.2f} | "
              f"{r['eval_loss_relative_difference']:.1e} |" for r in rows]
    lines += ["", "Best settings each (the fastest dtype and micro-batch of each path), ours / standard; ceiling: the "
              "useful work at the matmul peak over the standard path as measured:", "",
              "| LoRA, cutoff | standard | ours | tokens/s | ceiling | peak RSS | above libraries |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['standard_dtype']}, micro-batch {v['standard_micro_batch']} | {v['ours_dtype']}, micro-batch "
              f"{v['ours_micro_batch']} | {v['speedup']:.2f}x | {v['speedup_ceiling']:.2f}x | {v['memory_ratio']:.2f} | "
              f"{v['memory_ratio_above_libraries']:.2f} |" for k, v in sorted(best.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--val_rows", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="one configuration only")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path per configuration (the fastest counts)")
    parser.add_argument("--gpu", action="store_true", help="the 7B-shaped 8-bit/4-bit runs on a CUDA GPU")
    parser.add_argument("--only", default="8bit,4bit,bf16", help="with --gpu: which groups of runs (also: compile)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch_compile", action="store_true", help=argparse.SUPPRESS)
    for name in ("path", "lora", "dtype", "base", "data", "output_dir", "checkpointing", "chat_template"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--cutoff", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--micro_batch", type=int, default=4, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    sys.path.insert(0, str(REPO))
    worker(arguments) if arguments.worker else run_gpu(arguments) if arguments.gpu else run(arguments)
