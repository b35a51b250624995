"""Generation throughput: new tokens per second, one prompt at a time and in batches, and through the server.

    python bench/generate_throughput.py [--new_tokens 32] [--quick]

Models (random weights, so every answer runs to max_new_tokens and the counts are comparable): the demo size
(hidden 128, 4 layers, 1,024-token vocabulary) and a LLaMA-shaped model of about 200M parameters (hidden 1024,
12 layers, 16 heads, MLP 2816, the 32,000-token LLaMA vocabulary where ../shared has it). Each gets an adapter
(LoRA r=8 on q,v) and answers real Alpaca instructions greedily; the rate counts the tokens actually generated.
Server: 1, 4, 8 and 16 clients at once, each streaming the same number of tokens through the OpenAI client: batched,
one request at a time, and batched with two adapters of the base served together (the clients alternate between
them). Prints a table and writes bench/results/generate_throughput.json.
"""

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

MODELS = {"demo": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4),
          "llama-200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16)}


def build(name: str, shape: dict) -> tuple[Path, Path]:
    """Base model + two randomly initialised adapter folders (lora_B non-zero, so they have an effect)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_lora.bench import random_llama

    folder = RESULTS / f"generate-{name}"
    adapters = (folder / "adapter", folder / "adapter-b")
    if all((adapter / "adapter_config.json").exists() for adapter in adapters):
        return adapters
    tokenizer_model = None if name == "demo" else SHARED / "models" / "llama-tokenizer" / "tokenizer.model"
    base = random_llama(folder / "base", shape, tokenizer_model)
    for seed, adapter in enumerate(adapters):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(adapter)  # records base's path as base_model_name_or_path
        AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    return adapters


def instructions(count: int) -> list[str]:
    path = SHARED / "data" / "alpaca_sample_cleaned.json"
    rows = json.loads(path.read_text()) if path.exists() else [
        json.loads(line) for line in (REPO / "data" / "seed_tasks.jsonl").read_text().splitlines()]
    return [r["instruction"] for r in rows[:count]]


def measure(adapters: tuple[Path, Path], new_tokens: int, batch_sizes: list[int]) -> dict:
    from alpaca_lora.generate import Generator, Sampling

    generator = Generator(lora_weights=str(adapters[0]), device="cpu")
    parameters = sum(p.numel() for p in generator.model.parameters())
    sampling = Sampling(temperature=0.0, max_new_tokens=new_tokens)  # random weights rarely hit EOS: ~full length
    texts = [generator.template.prompt(i) for i in instructions(max(batch_sizes) * 2)]  # Alpaca prompts, as text
    prompts = [generator.text_ids(text) for text in texts]
    generator.answer(prompts[:2], sampling)  # warm-up
    result = {"parameters": parameters, "dtype": str(next(generator.model.parameters()).dtype), "batches": {}}
    for batch_size in batch_sizes:
        started = time.perf_counter()
        answers = generator.answer(prompts[:batch_size], sampling)
        seconds = time.perf_counter() - started
        result["batches"][batch_size] = sum(a.completion_tokens for a in answers) / seconds
        print(f"  batch {batch_size}: {result['batches'][batch_size]:.1f} new tokens/s", flush=True)
    # continuous batching (the default), one request at a time as before it, and two adapters mixed in every batch
    result["server"] = {**serve_clients(generator, sampling, texts, new_tokens, 8, "max_batch 8"),
                        **serve_clients(generator, sampling, texts, new_tokens, 1, "max_batch 1")}
    del generator
    mixed = Generator(lora_weights=f"a={adapters[0]},b={adapters[1]}", device="cpu")
    result["server"].update(serve_clients(mixed, sampling, texts, new_tokens, 8, "two adapters", models=("a", "b")))
    return result


CLIENTS = (1, 4, 8, 16)


def serve_clients(generator, sampling, texts: list[str], new_tokens: int, max_batch: int, label: str,
                  models=("x",)) -> dict:
    """The server on `generator` under 1, 4, 8 and 16 streaming clients (after a warm-up: the batch's first steps
    build their kernels): "<label>, <n> clients" -> streaming_clients' measurements."""
    from alpaca_lora.server import Server

    server = Server(generator, "127.0.0.1", 0, default_sampling=sampling, max_batch=max_batch, max_queue=64).start()
    streaming_clients(server.port, texts, 2, 4, models)
    measured = {}
    for clients in CLIENTS:
        m = measured[f"{label}, {clients} clients"] = streaming_clients(server.port, texts, clients, new_tokens, models)
        print(f"  server ({label}), {clients} streaming clients: {m['tokens_per_second']:.1f} new tokens/s, first "
              f"token median {m['ttft_median_s']:.2f} s, p95 {m['ttft_p95_s']:.2f} s", flush=True)
    server.stop()
    return measured


def streaming_clients(port: int, prompts: list[str], clients: int, new_tokens: int, models=("x",)) -> dict:
    """`clients` clients at once, each streaming one greedy answer to its own prompt (client i asks the model
    models[i % len(models)]): the tokens all of them received per second of the whole run, and each one's time to
    its first token."""
    import statistics

    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    tokens, first, failures = [0] * clients, [0.0] * clients, []

    def ask(i):
        try:
            answer(i)
        except Exception as error:  # raised below, not lost with its thread
            failures.append(error)

    def answer(i):
        sent = time.perf_counter()
        for chunk in client.completions.create(model=models[i % len(models)], prompt=prompts[i % len(prompts)], temperature=0,
                                               max_tokens=new_tokens, stream=True,
                                               stream_options={"include_usage": True}):
            if not first[i] and chunk.choices and chunk.choices[0].text:
                first[i] = time.perf_counter() - sent
            if chunk.usage:  # the last chunk, with stream_options.include_usage
                tokens[i] = chunk.usage.completion_tokens
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if failures:
        raise failures[0]
    ordered = sorted(first)
    return {"clients": clients, "tokens_per_second": sum(tokens) / seconds, "seconds": seconds,
            "ttft_median_s": statistics.median(ordered), "ttft_p95_s": ordered[min(len(ordered) - 1,
                                                                               round(0.95 * (len(ordered) - 1)))]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="the demo-size model only")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "new_tokens": args.new_tokens,
              "models": {}}
    for name, shape in MODELS.items():
        if args.quick and name != "demo":
            continue
        print(name, flush=True)
        report["models"][name] = measure(build(name, shape), args.new_tokens, [1, 8, 32])
    (RESULTS / "generate_throughput.json").write_text(json.dumps(report, indent=2))
    print("| model | parameters | dtype | 1 prompt | batch 8 | batch 32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in report["models"].items():
        b = r["batches"]
        print(f"| {name} | {r['parameters'] / 1e6:.0f}M | {r['dtype']} | {b[1]:.1f} | {b[8]:.1f} | {b[32]:.1f} |")
    print("\n| model | server | clients | new tokens/s, all clients | first token, median s | first token, p95 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in report["models"].items():
        for setting, m in r["server"].items():
            server = ("one at a time" if setting.startswith("max_batch 1,") else
                      "two adapters, batched" if setting.startswith("two adapters") else "batched (max_batch 8)")
            print(f"| {name} | {server} | {m['clients']} | {m['tokens_per_second']:.1f} | {m['ttft_median_s']:.2f} | "
                  f"{m['ttft_p95_s']:.2f} |")
