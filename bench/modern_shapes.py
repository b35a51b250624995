"""Training throughput on modern shapes (small models, large vocabularies): ours, the standard path and TRL's SFTTrainer.

    python bench/modern_shapes.py [--shapes qwen3-0.6b,gemma3-270m,llama3.2-1b] [--steps 4] [--repeats 2]

Shapes, random weights, real vocabularies (llama.cpp's vocabulary files in ../shared/models/vocab):
  gemma3-270m   hidden 640, 18 layers, 4 heads, 1 KV head, head_dim 256, MLP 2048, 262,144-row tied embedding.
                ../shared has no Gemma vocabulary: Qwen2's tokenizer, the embedding sized as Gemma 3's.
  qwen3-0.6b    hidden 1024, 16 heads, 8 KV heads, head_dim 128, MLP 3072, 151,936 vocabulary (Qwen2's), tied;
                8 of its 28 layers (a CPU run of the whole model takes minutes a step).
  llama3.2-1b   hidden 2048, 32 heads, 8 KV heads, MLP 8192, 128,256 vocabulary (Llama 3's), tied; 4 of its 16 layers.
Data: the real cleaned Alpaca sample; and on the Qwen3 shape also the project's two-turn conversations
(data/chat_sample.jsonl, ChatML, loss on the assistant turns only): the "qwen3-0.6b chat" rows.

Paths: ours (packing, the LM head only at response positions, in chunks: train_throughput.py's worker), the
standard path (padded, full logits: the same worker), and TRL's SFTTrainer at its best settings for this job:
padding-free (a micro-batch's examples end to end, position ids restarting at each), loss on the response only, its
fused chunked LM head, the same LoRA (r=8 on q,v, alpha 16, dropout 0.05), global batch, micro-batch, learning rate,
schedule and steps, bf16 where it is fast. TRL gets ours' tokenized examples (the same split, truncation and targets),
so both train the same tokens; held-out loss per response token after the last step (the order of examples differs:
each trainer shuffles with its own generator).

Each path runs twice, each time in a fresh process: a speed run (the default allocator; tokens per second leave out
the first step) and a memory run (glibc's mmap threshold fixed at 128 KB so that peak RSS follows live tensors
rather than what the allocator kept; 3 steps; slower, so not timed). Peak memory is resident memory above what the
process held after importing the libraries; TRL's is read before its evaluation, which takes all held-out rows in one
batch so that its loss is per token like the others'. MFU (ours): useful FLOPs per second (4 x decoder parameters
per real token, attention, and 4 x hidden x vocabulary per target token: forward and backward to the activations, the
base being frozen) over the best large bf16 matmul measured here, before and after the runs. Prints a table and writes
bench/results/modern_shapes.json.
"""

import argparse
import json
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
# run name -> (shape, data, chat template, held-out rows, steps): the conversations are 88 rows, 4 steps of 16 after 24
CHAT_RUN = ("qwen3-0.6b", REPO / "data" / "chat_sample.jsonl", "chatml", 24, 4)


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
                                          chat_template=args.chat_template or "", tokenized_cache_dir="").validated())

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
    training_peak = _memory_mb("VmHWM")  # before evaluation: it takes every held-out row in one batch
    eval_loss = trainer.evaluate()["eval_loss"]
    seconds = last - first
    print("RESULT " + json.dumps({
        "real_tokens_per_second": (tokens_last - tokens_first) / seconds, "seconds_per_step": seconds / (len(steps) - 1),
        "first_step_seconds": first - started, "peak_rss_mb": training_peak,
        "peak_above_libraries_mb": training_peak - libraries_rss, "eval_loss": eval_loss,
        "train_losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}))


def launch(args, path: str, run: dict, memory: bool) -> dict:
    """One run in a fresh process: ours and standard through train_throughput.py's worker, TRL through ours here.
    memory: the live-memory run (see the docstring), else the speed run."""
    from train_throughput import run_worker

    steps = 3 if memory else run["steps"]
    common = ["--base", str(run["base"]), "--data", str(run["data"]), "--steps", str(steps),
              "--batch_size", str(args.batch_size), "--val_rows", str(run["val_rows"]), "--cutoff", str(args.cutoff),
              "--micro_batch", str(args.micro_batch), "--dtype", args.dtype, "--chat_template", run["chat_template"],
              "--output_dir", str(RESULTS / "runs" / f"modern-{run['name'].replace(' ', '-')}-{path}")]
    if path == "trl":
        command = [sys.executable, __file__, "--worker", *common]
    else:
        command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--worker", "--path", path, "--lora",
                   "qv-r8", "--checkpointing", "off", *common]
    result = run_worker(command, live_memory=memory)
    if "failed" in result:  # its last line, for the table
        result["failed"] = result["failed"].splitlines()[-1]
    return result


def runs_wanted(args, data: Path) -> list[dict]:
    wanted = [dict(name=shape, shape=shape, data=data, chat_template="", val_rows=args.val_rows, steps=args.steps)
              for shape in args.shapes.split(",")]
    shape, chat_data, chat_template, val_rows, steps = CHAT_RUN
    if args.conversations and shape in args.shapes.split(","):
        wanted.append(dict(name=f"{shape} chat", shape=shape, data=chat_data, chat_template=chat_template,
                           val_rows=val_rows, steps=steps))
    return wanted


def run(args) -> None:
    from train_throughput import data_file, peak_matmul_flops, useful_flops_per_second

    RESULTS.mkdir(parents=True, exist_ok=True)
    peak = peak_matmul_flops(args.dtype)
    print(f"peak matmul ({args.dtype}): {peak / 1e9:.0f} GFLOP/s", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "dtype": args.dtype,
              "batch_size": args.batch_size, "micro_batch": args.micro_batch, "cutoff": args.cutoff, "runs": {}}
    for wanted in runs_wanted(args, data_file()):
        wanted["base"] = build(wanted["shape"])
        # speed runs of ours and the standard path alternate, --repeats times (the fastest counts: on a shared
        # machine interference only slows a run down); TRL, several times slower, runs once
        speed = {path: [] for path in ("ours", "standard", "trl")}
        for repeat in range(args.repeats):
            for path in speed if repeat == 0 else ("ours", "standard"):
                speed[path].append(launch(args, path, wanted, memory=False))
        measured = {}
        for path in speed:
            fastest = max(speed[path], key=lambda m: m.get("real_tokens_per_second", 0))
            live = launch(args, path, wanted, memory=True)
            if "failed" not in fastest and "failed" not in live:
                fastest["live_peak_above_libraries_mb"] = live["peak_above_libraries_mb"]
                fastest["tokens_per_second_of_each_run"] = [m.get("real_tokens_per_second") for m in speed[path]]
            measured[path] = fastest if "failed" not in live else live
            print(f"  {wanted['name']} {path}: " + (f"failed: {measured[path]['failed']}" if "failed" in measured[path]
                  else f"{fastest['real_tokens_per_second']:.0f} tokens/s, {live['peak_above_libraries_mb']:.0f} MB "
                       f"live peak, eval loss {fastest['eval_loss']:.5f}"), flush=True)
        report["runs"][wanted["name"]] = {"base": str(wanted["base"]), "data": str(wanted["data"]),
                                          "steps": wanted["steps"], **measured}
        (RESULTS / "modern_shapes.json").write_text(json.dumps(report, indent=2, default=str))
    # the physical limit is the best this machine showed: measured again after the runs (the rate varies)
    report["peak_flops"] = max(peak, peak_matmul_flops(args.dtype))
    for name, measured in report["runs"].items():
        if "failed" not in measured["ours"]:
            config = json.loads((Path(measured["base"]) / "config.json").read_text())
            measured["ours"]["mfu"] = useful_flops_per_second(measured["ours"], args.cutoff, config) / report["peak_flops"]
    (RESULTS / "modern_shapes.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"peak matmul, best of before and after: {report['peak_flops'] / 1e9:.0f} GFLOP/s")
    print(table(report))


def table(report: dict) -> str:
    lines = ["| run | path | real tokens/s | s/step | live peak above libraries MB | eval loss | MFU | ours is |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, paths in report["runs"].items():
        ours = paths["ours"]
        for path in ("ours", "standard", "trl"):
            m = paths[path]
            if "failed" in m:
                lines.append(f"| {name} | {path} | failed: {m['failed']} | | | | | |")
                continue
            versus = "" if path == "ours" or "failed" in ours else (
                f"{ours['real_tokens_per_second'] / m['real_tokens_per_second']:.2f}x as fast, "
                f"{ours['live_peak_above_libraries_mb'] / m['live_peak_above_libraries_mb']:.2f}x the memory")
            mfu = f"{m['mfu']:.1%}" if "mfu" in m else ""
            lines.append(f"| {name} | {path} | {m['real_tokens_per_second']:.0f} | {m['seconds_per_step']:.2f} | "
                         f"{m['live_peak_above_libraries_mb']:.0f} | {m['eval_loss']:.5f} | {mfu} | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="speed runs of ours and the standard path each")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--val_rows", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--conversations", type=int, default=1, help="1: also the conversation run on qwen3-0.6b")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("base", "data", "output_dir", "chat_template"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    trl_worker(arguments) if arguments.worker else run(arguments)
