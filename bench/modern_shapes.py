"""Training throughput on modern shapes (small models, large vocabularies): ours, the standard path and TRL's SFTTrainer.

    python bench/modern_shapes.py [--shapes qwen3-0.6b,gemma3-270m,llama3.2-1b] [--steps 6] [--repeats 1]

Shapes, random weights, real vocabularies (llama.cpp's vocabulary files in ../shared/models/vocab):
  gemma3-270m   hidden 640, 18 layers, 4 heads, 1 KV head, head_dim 256, MLP 2048, 262,144-row tied embedding.
                ../shared has no Gemma vocabulary: Qwen2's tokenizer, the embedding sized as Gemma 3's.
  qwen3-0.6b    hidden 1024, 16 heads, 8 KV heads, head_dim 128, MLP 3072, 151,936 vocabulary (Qwen2's), tied;
                8 of its 28 layers (a CPU run of the whole model takes minutes a step).
  llama3.2-1b   hidden 2048, 32 heads, 8 KV heads, MLP 8192, 128,256 vocabulary (Llama 3's), tied; 4 of its 16 layers.

Paths, each in a fresh process (peak memory its own; glibc's mmap threshold fixed at 128 KB so that peak RSS follows
live tensors): ours (packing, the LM head only at response positions, in chunks: train_throughput.py's worker), the
standard path (padded, full logits: the same worker), and TRL's SFTTrainer at its best settings for this job:
padding-free (a micro-batch's examples end to end, position ids restarting at each), loss on the response only, its
fused chunked LM head, the same LoRA (r=8 on q,v, alpha 16, dropout 0.05), global batch, micro-batch, learning rate,
schedule and steps, bf16 where it is fast. TRL gets ours' tokenized examples (the cleaned Alpaca sample, the same
split, truncation and targets), so both train the same tokens; held-out loss per response token after the last step
(the order of examples differs: each trainer shuffles with its own generator). Tokens per second leave out the first step. Prints a table and writes
bench/results/modern_shapes.json.
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
VOCABULARIES = SHARED / "models" / "vocab"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# name -> (model_type, config fields, llama.cpp vocabulary file)
SHAPES = {
    "gemma3-270m": ("gemma3_text", dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                                        vocab_size=262_144, tie_word_embeddings=True, sliding_window=512,
                                        query_pre_attn_scalar=256), "qwen2"),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, intermediate_size=3072, vocab_size=151_936, tie_word_embeddings=True),
                   "qwen2"),
    "llama3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                                  intermediate_size=8192, vocab_size=128_256, tie_word_embeddings=True), "llama-bpe"),
}
LORA = dict(r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])


def build(name: str) -> Path:
    """The shape's base model folder (random bf16 weights, its tokenizer), built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alpaca_lora.files import staged

    folder = RESULTS / f"modern-{name}"
    if (folder / "config.json").exists():
        return folder
    model_type, fields, vocabulary = SHAPES[name]
    path = VOCABULARIES / f"ggml-vocab-{vocabulary}.gguf"
    if not path.exists():
        sys.exit(f"bench: {path} is absent: this benchmark needs ../shared beside the clone")
    with staged(folder) as staging:
        tokenizer = AutoTokenizer.from_pretrained(VOCABULARIES, gguf_file=path.name)
        tokenizer.save_pretrained(staging)
        config = AutoConfig.for_model(model_type, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **fields)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(staging)
    return folder


def trl_worker(args) -> None:
    """One TRL SFTTrainer run in this process; prints one JSON line of measurements."""
    import peft  # noqa: F401  (imported before the baseline reading, as the other paths do)
    import transformers  # noqa: F401

    from train_throughput import _memory_mb

    libraries_rss = _memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alpaca_lora.config import TrainConfig
    from alpaca_lora.data import IGNORE_INDEX
    from alpaca_lora.train import load_training_data

    # exactly ours' examples: the same split, tokens, truncation at cutoff and targets (train() with seed 0)
    data = load_training_data(TrainConfig(base_model=args.base, data_path=args.data, output_dir=args.output_dir,
                                          val_set_size=args.val_rows, cutoff_len=args.cutoff, seed=0,
                                          tokenized_cache_dir="").validated())

    def as_dataset(examples):  # TRL's pre-tokenized form: labels unshifted, -100 where no loss
        return Dataset.from_list([{"input_ids": e.input_ids.tolist(), "labels": [IGNORE_INDEX] + [
            int(token) if target != IGNORE_INDEX else IGNORE_INDEX
            for token, target in zip(e.input_ids[1:], e.targets[:-1])]} for e in examples])
    bf16 = args.dtype == "bf16"
    # bf16 weights and autocast, as ours loads them (peft keeps the LoRA weights in fp32)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16 if bf16 else torch.float32)
    steps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            steps.append((time.perf_counter(), state.num_input_tokens_seen))

    # padding-free without packing: each micro-batch is micro_batch examples laid end to end (position ids restart
    # at each), as ours lays them, so both see the same examples per step; max_length None: they are cut already
    config = SFTConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch_size // args.micro_batch, max_steps=args.steps, learning_rate=3e-4,
        lr_scheduler_type="linear", warmup_steps=0, bf16=bf16, use_cpu=True, seed=0, logging_steps=1,
        report_to=[], save_strategy="no", max_length=None, padding_free=True, packing=False,
        include_num_input_tokens_seen="all", per_device_eval_batch_size=len(data.val_set.examples),
        dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=as_dataset(data.train_set.examples),
                         eval_dataset=as_dataset(data.val_set.examples), processing_class=data.tokenizer,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=LORA["targets"], task_type="CAUSAL_LM"),
                         callbacks=[StepClock()])
    started = time.perf_counter()
    trainer.train()
    (first, tokens_first), (last, tokens_last) = steps[0], steps[-1]
    eval_loss = trainer.evaluate()["eval_loss"]
    seconds = last - first
    print("RESULT " + json.dumps({
        "real_tokens_per_second": (tokens_last - tokens_first) / seconds, "seconds_per_step": seconds / (len(steps) - 1),
        "first_step_seconds": first - started, "peak_rss_mb": _memory_mb("VmHWM"),
        "peak_above_libraries_mb": _memory_mb("VmHWM") - libraries_rss, "eval_loss": eval_loss,
        "train_losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}))


def launch(args, path: str, shape: str, base: Path, data: Path) -> dict:
    """One run in a fresh process: ours and standard through train_throughput.py's worker, TRL through ours here."""
    common = ["--base", str(base), "--data", str(data), "--steps", str(args.steps), "--batch_size", str(args.batch_size),
              "--val_rows", str(args.val_rows), "--cutoff", str(args.cutoff), "--micro_batch", str(args.micro_batch),
              "--dtype", args.dtype, "--output_dir", str(RESULTS / "runs" / f"modern-{shape}-{path}")]
    if path == "trl":
        command = [sys.executable, __file__, "--worker", *common]
    else:
        command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--worker", "--path", path, "--lora",
                   "qv-r8", "--checkpointing", "off", *common]
    env = {**os.environ, "WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": str(2 ** 17)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        return {"failed": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "no result"}
    return json.loads(lines[-1][len("RESULT "):])


def run(args) -> None:
    from train_throughput import data_file, peak_matmul_flops

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = data_file()
    peak = peak_matmul_flops(args.dtype)
    print(f"peak matmul ({args.dtype}): {peak / 1e9:.0f} GFLOP/s", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "dtype": args.dtype,
              "steps": args.steps, "batch_size": args.batch_size, "micro_batch": args.micro_batch, "cutoff": args.cutoff,
              "peak_flops": peak, "shapes": {}}
    for shape in args.shapes.split(","):
        base = build(shape)
        runs = {path: [] for path in ("ours", "standard", "trl")}
        for _ in range(args.repeats):
            for path in runs:
                measured = launch(args, path, shape, base, data)
                runs[path].append(measured)
                print(f"  {shape} {path}: " + (f"failed: {measured['failed']}" if "failed" in measured else
                      f"{measured['real_tokens_per_second']:.0f} tokens/s, {measured['peak_rss_mb']:.0f} MB peak, "
                      f"eval loss {measured['eval_loss']:.5f}"), flush=True)
        report["shapes"][shape] = {path: max(done, key=lambda m: m.get("real_tokens_per_second", 0))
                                   for path, done in runs.items()}
        (RESULTS / "modern_shapes.json").write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = ["| shape | path | real tokens/s | s/step | peak RSS MB | above libraries MB | eval loss | ours is |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, paths in report["shapes"].items():
        ours = paths["ours"]
        for path, m in paths.items():
            if "failed" in m:
                lines.append(f"| {shape} | {path} | failed: {m['failed']} | | | | | |")
                continue
            versus = "" if path == "ours" or "failed" in ours else (
                f"{ours['real_tokens_per_second'] / m['real_tokens_per_second']:.2f}x as fast, "
                f"{ours['peak_above_libraries_mb'] / m['peak_above_libraries_mb']:.2f}x the memory")
            lines.append(f"| {shape} | {path} | {m['real_tokens_per_second']:.0f} | {m['seconds_per_step']:.2f} | "
                         f"{m['peak_rss_mb']:.0f} | {m['peak_above_libraries_mb']:.0f} | {m['eval_loss']:.5f} | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--val_rows", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("base", "data", "output_dir"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    trl_worker(arguments) if arguments.worker else run(arguments)
