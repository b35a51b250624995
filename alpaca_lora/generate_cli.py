"""generate.py's command line: one instruction, an interactive session, a batch file, or the server.

The engine (Generator, Sampling) lives in generate.py and the HTTP layer in server.py; this module picks the
mode the flags ask for and runs it.
"""

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .data import load_rows, validate_rows
from .files import append_jsonl, resume_jsonl
from .generate import Generator, Sampling
from .mixed_adapters import parse_adapters
from .server import Server


@dataclass
class GenerateConfig:
    """Every flag of generate.py, with its default."""

    base_model: str = field(default="", metadata={"help": "hub id or folder of the base model (default: the one the adapter names)"})
    lora_weights: str = field(default="", metadata={
        "help": "adapter folder from finetune.py (none for a merged model); --serve also takes several adapters of one "
                "base as name=folder,name=folder (requests pick one by model name, the base by its own)"})
    prompt_template: str = field(default="", metadata={
        "help": "Alpaca template name or .json path, used without a chat template (default: the adapter's, else alpaca)"})
    chat_template: str = field(default="", metadata={
        "help": "tokenizer, alpaca, chatml, gemma, llama3, mistral, phi3 or a .jinja path (default: the one the adapter "
                "was trained with, if any)"})
    load_8bit: bool = field(default=False, metadata={"help": "8-bit base weights (bitsandbytes)"})
    load_4bit: bool = field(default=False, metadata={"help": "4-bit NF4 base weights (bitsandbytes)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 weights; default: where bf16 is fast, fp32 otherwise"})
    instruction: str = field(default="", metadata={"help": "answer this one instruction and exit"})
    input: str = field(default="", metadata={"help": "the optional input of --instruction"})
    input_file: str = field(default="", metadata={
        "help": "answer every row of this .json/.jsonl file (Alpaca rows, or conversations up to their last answer)"})
    output_file: str = field(default="", metadata={"help": "JSONL answers of --input_file (rerunning resumes)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call with --input_file"})
    serve: bool = field(default=False, metadata={"help": "run the OpenAI-compatible server with a web page"})
    server_name: str = field(default="127.0.0.1", metadata={"help": "address the server binds"})
    port: int = field(default=8000, metadata={"help": "port the server listens on"})
    api_key: str = field(default="", metadata={"help": "require 'Authorization: Bearer KEY' on every API request"})
    max_tokens_cap: int = field(default=1024, metadata={"help": "the largest max_tokens a server request may ask"})
    max_batch: int = field(default=8, metadata={"help": "server: requests generated together at most (1: one at a time)"})
    max_queue: int = field(default=16, metadata={"help": "server: requests that may wait beyond those; more get 429"})
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
    for flag, low in (("batch_size", 1), ("max_batch", 1), ("max_queue", 0)):
        value = getattr(config, flag)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{flag} {value!r}: must be a whole number >= {low}")
    sampling = Sampling(config.temperature, config.top_p, config.top_k, config.num_beams, config.max_new_tokens,
                        config.repetition_penalty).validated(max_new_tokens_cap=100_000)
    if len(parse_adapters(config.lora_weights)) > 1 and not config.serve:
        raise ValueError(f"--lora_weights {config.lora_weights!r}: several adapters are served together (--serve); "
                         "pass one folder to answer here")
    if config.input_file and not Path(config.input_file).expanduser().is_file():
        raise ValueError(f"--input_file {config.input_file}: no such file")
    generator = Generator(config.base_model, config.lora_weights, config.prompt_template, config.load_8bit,
                          config.load_4bit, config.bf16, chat_template=config.chat_template)
    if config.serve:
        server = Server(generator, config.server_name, config.port, config.api_key, config.max_tokens_cap, sampling,
                        config.max_batch, config.max_queue)
        if not server.loopback and not config.api_key:
            write(f"warning: serving on {config.server_name} without --api_key: anyone who can reach this machine "
                  "can use the model")
        write(f"serving {', '.join(generator.served)} on http://{config.server_name}:{server.port}/ "
              f"(OpenAI API under /v1{', API key required' if config.api_key else ''}); Ctrl-C stops")
        server.serve()
    elif config.input_file:
        try:
            count = answer_file(generator, config.input_file, config.output_file, sampling, config.batch_size,
                                config.seed, progress=write)
        except KeyboardInterrupt:  # Ctrl-C: every finished batch is already in the file
            write(f"stopped: the rows answered so far are in {config.output_file}; the same command resumes")
            return
        write(f"answered {count} rows into {config.output_file}")
    elif config.instruction:
        _stream_answer(generator, generator.instruction_ids(config.instruction, config.input), sampling, config.seed,
                       write)
    else:
        interactive(generator, sampling, config.seed, read, write)


def interactive(generator: Generator, sampling: Sampling, seed, read=input, write=print) -> None:
    """Instruction, optional input, streamed answer, again; with a chat template, one conversation that goes on
    ('/new' starts another). Ctrl-C during an answer stops that answer; at a prompt (like Ctrl-D or 'exit') it
    leaves."""
    chat = generator.chat_template is not None
    write("Type an instruction (Ctrl-D or 'exit' to leave; Ctrl-C stops an answer)."
          + (" The conversation goes on; '/new' starts another." if chat else ""))
    history = []
    while True:
        try:
            instruction = read("You: " if chat else "Instruction: ").strip()
            if instruction in ("exit", "quit"):
                return
            if chat and instruction == "/new":
                history = []
                continue
            if not instruction:
                continue
            extra = "" if chat else read("Input (optional): ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at a prompt: leave quietly
            write("")
            return
        if not chat:
            _stream_answer(generator, generator.instruction_ids(instruction, extra), sampling, seed, write)
            continue
        history.append({"role": "user", "content": instruction})
        answer = _stream_answer(generator, generator.conversation_ids(history), sampling, seed, write)
        history.append({"role": "assistant", "content": answer})


def _stream_answer(generator: Generator, prompt: list[int], sampling: Sampling, seed, write) -> str:
    """Write the answer as it is generated; returns its text (as far as it got, if stopped)."""
    if sampling.num_beams > 1:  # beam search settles the text only at the end
        text = generator.answer([prompt], sampling, seed)[0].text
        write(text)
        return text
    stop = threading.Event()
    pieces = generator.stream(prompt, sampling, seed, stop)
    shown = ""
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            break
        except KeyboardInterrupt:  # stop this answer, keep the program
            stop.set()
            continue
        if isinstance(piece, str):
            piece = piece if shown else piece.lstrip()
            write(piece, end="", flush=True)
            shown += piece
    write("" if not stop.is_set() else " [stopped]")
    return shown.strip()


def answer_file(generator: Generator, input_file: str, output_file: str, sampling: Sampling, batch_size: int,
                seed: int | None, skip_bad_rows: bool = False, progress=print) -> int:
    """Answer every row of a file into JSONL, as it goes; rows already answered are skipped, so an interrupted run
    loses nothing. Alpaca rows are answered as instructions; a conversation's last assistant message is the
    reference, and the model answers the messages before it. Returns how many rows were answered now."""
    loaded = load_rows(input_file)
    rows, _ = validate_rows(loaded, skip_bad_rows)
    output = Path(output_file).expanduser()
    done = {_question_key(record) for record in resume_jsonl(output) if isinstance(record, dict)}
    todo = [row for row in rows if _question_key(_question(row)) not in done]
    output.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        prompts = [generator.conversation_ids(row["messages"][:-1]) if "messages" in row
                   else generator.instruction_ids(row["instruction"], row["input"]) for row in batch]
        answers = generator.answer(prompts, sampling, seed)
        append_jsonl(output, [{**_question(row), "output": answer.text, "reference": _reference(row),
                               "finish_reason": answer.finish_reason} for row, answer in zip(batch, answers)])
        progress(f"{len(done) + start + len(batch)}/{len(rows)} rows answered")
    return len(todo)


def _question(row: dict) -> dict:
    if "messages" in row:
        return {"messages": row["messages"][:-1]}
    return {"instruction": row["instruction"], "input": row["input"]}


def _reference(row: dict) -> str:
    return row["messages"][-1]["content"] if "messages" in row else row["output"]


def _question_key(record: dict) -> str:
    if "messages" in record:
        return json.dumps(record["messages"], ensure_ascii=False, sort_keys=True)
    return json.dumps([record.get("instruction"), record.get("input", "")], ensure_ascii=False)
