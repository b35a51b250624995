"""Generate: answer instructions with a base model + LoRA adapter, one prompt at a time or in batches.

Prompts are built with the same template and the same token layout as training ([BOS] + prompt tokens),
so the model sees at inference exactly what it was trained on. The adapter folder describes itself
(training_summary.json names the base model and the template), so `lora_weights` alone is enough.
"""

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import drop_partial_last_line, load_rows, validate_rows
from .model import fast_bf16_available, load_model, load_tokenizer
from .templates import load_template


@dataclass
class Sampling:
    """What the sampling flags mean: temperature 0 is greedy, > 0 samples; num_beams > 1 is beam search."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    num_beams: int = 1
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0

    def validated(self, max_new_tokens_cap: int, prefix: str = "--") -> "Sampling":
        def bad(name, rule):
            return ValueError(f"{prefix}{name} {getattr(self, name)!r}: must be {rule}")
        numbers = {"temperature": (0, 100), "top_p": (0, 1), "repetition_penalty": (0, 100)}
        for name, (low, high) in numbers.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise bad(name, f"a number in [{low}, {high}]")
        if self.top_p == 0 or self.repetition_penalty == 0:
            raise bad("top_p" if self.top_p == 0 else "repetition_penalty", "greater than 0")
        for name, low, high in (("top_k", 0, 100_000), ("num_beams", 1, 64), ("max_new_tokens", 1, max_new_tokens_cap)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(name, f"a whole number in [{low}, {high}]")
        return self

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: say so, or generation_config.json's sampling defaults would apply
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)


def describe_adapter(lora_weights: str) -> dict:
    """What the adapter folder says about itself: base model and prompt template."""
    folder = Path(lora_weights).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"--lora_weights {lora_weights}: no adapter_config.json there; pass a folder finetune.py wrote")
    description = {"base_model": json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")}
    summary = folder / "training_summary.json"
    if summary.is_file():
        saved = json.loads(summary.read_text())
        description.update(base_model=saved["base_model"], prompt_template=saved["prompt_template"]["name"])
    return description


class Generator:
    """A loaded model, its tokenizer and template; answers lists of prompts."""

    def __init__(self, base_model: str = "", lora_weights: str = "", prompt_template: str = "",
                 load_8bit: bool = False, load_4bit: bool = False, bf16: bool | None = None, device: str = ""):
        adapter = describe_adapter(lora_weights) if lora_weights else {}
        base_model = base_model or adapter.get("base_model") or ""
        if not base_model:
            raise ValueError("--base_model is required (or an adapter folder that names its base model)")
        self.device = torch.device(device) if device else _default_device()
        use_bf16 = fast_bf16_available(self.device) if bf16 is None else bf16
        self.template = load_template(prompt_template or adapter.get("prompt_template") or "alpaca")
        # the adapter folder carries the tokenizer it was trained with (pad token included)
        self.tokenizer = load_tokenizer(lora_weights if lora_weights and (Path(lora_weights) / "tokenizer_config.json").exists()
                                        else base_model)
        quantization = "4bit" if load_4bit else "8bit" if load_8bit else None
        model = load_model(base_model, quantization, use_bf16, self.device)
        model.config.use_cache = True  # load_model sets it off for training; generation needs the KV cache
        if lora_weights:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, lora_weights)
            except (RuntimeError, ValueError, KeyError) as error:
                first = str(error).strip().splitlines()[0][:200]
                raise ValueError(f"--lora_weights {lora_weights}: does not fit --base_model {base_model} ({first}); "
                                 "pass the base model the adapter was trained on") from None
        self.model = model.eval()
        self.name = Path(lora_weights).name if lora_weights else Path(base_model).name
        self.context_length = getattr(model.config, "max_position_embeddings", 2048)
        self.lock = threading.Lock()  # one generation at a time: concurrent callers queue, never interleave

    def prompt_ids(self, prompt: str) -> list[int]:
        """Exactly the training layout: [BOS] + the prompt's tokens, nothing appended."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def build_prompt(self, instruction: str, input: str = "") -> str:
        return self.template.prompt(instruction, input)

    def answer(self, prompts: list[str], sampling: Sampling, seed: int | None = None, streamer=None,
               stopping_criteria=None) -> list[Answer]:
        """Answer a batch: left-padded with an attention mask, so each answer equals the prompt answered alone."""
        ids = [self.prompt_ids(p) for p in prompts]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        with self.lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                         stopping_criteria=stopping_criteria, pad_token_id=pad,
                                         eos_token_id=self.tokenizer.eos_token_id, **sampling.generate_kwargs())
        answers = []
        for row, prompt_ids in enumerate(ids):
            new = output[row, width:].tolist()
            stopped = self.tokenizer.eos_token_id in new
            if stopped:
                new = new[:new.index(self.tokenizer.eos_token_id)]
            while new and new[-1] == pad:
                new.pop()
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            # only the new tokens are decoded, so the answer needs no cutting at the response marker
            answers.append(Answer(text=text.strip(),
                                  prompt_tokens=len(prompt_ids), completion_tokens=len(new),
                                  finish_reason="stop" if stopped else "length"))
        return answers

    def stream(self, prompt: str, sampling: Sampling, seed: int | None = None, stop_event=None):
        """Yield the answer's text as it is generated; the last item is the finished Answer."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if sampling.num_beams > 1:
            raise ValueError("num_beams > 1 cannot stream: beam search settles the text only at the end")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop_event is not None and stop_event.is_set()

        result = {}

        def run():
            try:
                result["answer"] = self.answer([prompt], sampling, seed, streamer, StoppingCriteriaList([Stop()]))[0]
            except Exception as error:  # surfaced to the caller below
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for text in streamer:
            if text:
                yield text
        thread.join()
        if "error" in result:
            raise result["error"]
        yield result["answer"]


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def answer_file(generator: Generator, input_file: str, output_file: str, sampling: Sampling, batch_size: int,
                seed: int | None, skip_bad_rows: bool = False, progress=print) -> int:
    """Answer every row of an Alpaca-format file into JSONL, as it goes; rows already answered are skipped,
    so an interrupted run loses nothing. Returns how many rows were answered now."""
    loaded = load_rows(input_file)
    rows, _ = validate_rows(loaded, skip_bad_rows)
    output = Path(output_file).expanduser()
    done = set()
    if output.is_file():
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done.add((record["instruction"], record.get("input", "")))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill: that row is answered again
        drop_partial_last_line(output)
    todo = [row for row in rows if (row["instruction"], row["input"]) not in done]
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            answers = generator.answer([generator.build_prompt(r["instruction"], r["input"]) for r in batch],
                                       sampling, seed)
            for row, answer in zip(batch, answers):
                out.write(json.dumps({"instruction": row["instruction"], "input": row["input"], "output": answer.text,
                                      "reference": row["output"], "finish_reason": answer.finish_reason},
                                     ensure_ascii=False) + "\n")
            out.flush()
            progress(f"{len(done) + start + len(batch)}/{len(rows)} rows answered")
    return len(todo)


@dataclass
class GenerateConfig:
    """Every flag of generate.py, with its default."""

    base_model: str = field(default="", metadata={"help": "hub id or folder of the base model (default: the one the adapter names)"})
    lora_weights: str = field(default="", metadata={"help": "adapter folder from finetune.py (none for a merged model)"})
    prompt_template: str = field(default="", metadata={"help": "template name or .json path (default: the adapter's, else alpaca)"})
    load_8bit: bool = field(default=False, metadata={"help": "8-bit base weights (bitsandbytes)"})
    load_4bit: bool = field(default=False, metadata={"help": "4-bit NF4 base weights (bitsandbytes)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 weights; default: where bf16 is fast, fp32 otherwise"})
    instruction: str = field(default="", metadata={"help": "answer this one instruction and exit"})
    input: str = field(default="", metadata={"help": "the optional input of --instruction"})
    input_file: str = field(default="", metadata={"help": "answer every row of this Alpaca .json/.jsonl file"})
    output_file: str = field(default="", metadata={"help": "JSONL answers of --input_file (rerunning resumes)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call with --input_file"})
    serve: bool = field(default=False, metadata={"help": "run the OpenAI-compatible server with a web page"})
    server_name: str = field(default="127.0.0.1", metadata={"help": "address the server binds"})
    port: int = field(default=8000, metadata={"help": "port the server listens on"})
    api_key: str = field(default="", metadata={"help": "require 'Authorization: Bearer KEY' on every API request"})
    max_tokens_cap: int = field(default=1024, metadata={"help": "the largest max_tokens a server request may ask"})
    temperature: float = field(default=0.7, metadata={"help": "0: greedy; > 0: sampling at this temperature"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass (when sampling)"})
    top_k: int = field(default=40, metadata={"help": "sample among the k likeliest tokens (0: all)"})
    num_beams: int = field(default=1, metadata={"help": "beam search with this many beams when > 1"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer in tokens"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty on repeated tokens (1: none)"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling (reproducible answers)"})


def run_generate(config: GenerateConfig, read=input, write=print) -> None:
    """The mode the flags ask for: server, batch file, one instruction, or an interactive session."""
    if bool(config.input_file) != bool(config.output_file):
        raise ValueError("--input_file and --output_file go together: pass both")
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"--batch_size {config.batch_size!r}: must be a whole number >= 1")
    sampling = Sampling(config.temperature, config.top_p, config.top_k, config.num_beams, config.max_new_tokens,
                        config.repetition_penalty).validated(max_new_tokens_cap=100_000)
    if config.input_file and not Path(config.input_file).expanduser().is_file():
        raise ValueError(f"--input_file {config.input_file}: no such file")
    generator = Generator(config.base_model, config.lora_weights, config.prompt_template, config.load_8bit,
                          config.load_4bit, config.bf16)
    if config.serve:
        from .server import make_server

        server = make_server(generator, config.server_name, config.port, config.api_key, config.max_tokens_cap, sampling)
        write(f"serving {generator.name} on http://{config.server_name}:{server.server_address[1]}/ "
              f"(OpenAI API under /v1{', API key required' if config.api_key else ''}); Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.server_close()
    elif config.input_file:
        count = answer_file(generator, config.input_file, config.output_file, sampling, config.batch_size, config.seed,
                            progress=write)
        write(f"answered {count} rows into {config.output_file}")
    elif config.instruction:
        _stream_answer(generator, generator.build_prompt(config.instruction, config.input), sampling, config.seed, write)
    else:
        interactive(generator, sampling, config.seed, read, write)


def interactive(generator: Generator, sampling: Sampling, seed, read=input, write=print) -> None:
    """Instruction, optional input, streamed answer, again. Ctrl-C during an answer stops that answer; at a
    prompt (like Ctrl-D or 'exit') it leaves."""
    write("Type an instruction (Ctrl-D or 'exit' to leave; Ctrl-C stops an answer).")
    while True:
        try:
            instruction = read("Instruction: ").strip()
            if instruction in ("exit", "quit"):
                return
            if not instruction:
                continue
            extra = read("Input (optional): ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at a prompt: leave quietly
            write("")
            return
        _stream_answer(generator, generator.build_prompt(instruction, extra), sampling, seed, write)


def _stream_answer(generator: Generator, prompt: str, sampling: Sampling, seed, write) -> None:
    if sampling.num_beams > 1:  # beam search settles the text only at the end
        write(generator.answer([prompt], sampling, seed)[0].text)
        return
    stop = threading.Event()
    pieces = generator.stream(prompt, sampling, seed, stop)
    started = False
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            break
        except KeyboardInterrupt:  # stop this answer, keep the program
            stop.set()
            continue
        if isinstance(piece, str):
            write(piece.lstrip() if not started else piece, end="", flush=True)
            started = True
    write("" if not stop.is_set() else " [stopped]")
