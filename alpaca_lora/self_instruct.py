"""Self-instruct: regenerate Alpaca-style instruction data through an OpenAI-compatible API, and clean it.

One request shows the model a few seed tasks (seeded choice) and asks for a numbered list of new tasks in
a strict `Instruction / Input / Output` format. Each parsed task passes the filters Stanford's
generate_instruction.py used (length, blacklisted words, "Write a program" openers, a leading punctuation
or non-ASCII character) and is kept only if its ROUGE-L F-measure with every instruction kept so far (seeds
included) is at most 0.7 (rouge.py makes that check fast).
"""

import asyncio
import json
import random
import re
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .api import Client, FatalAPIError, make_spend
from .data import SEED_TASKS, load_rows, validate_rows
from .files import append_jsonl, resume_jsonl, write_text_atomically
from .rouge import ROUGE_THRESHOLD, RougeIndex

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
NO_INPUT = re.compile(r"^\s*(<\s*no\s*input\s*>|no\s*input\.?|noinput|n/?a|none|-|\"\")\s*$", re.IGNORECASE)
OUTPUT_FILE, STATE_FILE, SUMMARY_FILE = "regen.jsonl", "state.json", "summary.json"
MAX_BARREN_BATCHES = 20


# ---- the prompt and its answers ----

PROMPT_HEAD = """Write {count} new tasks that a person might ask an AI assistant to do, each with an example and the answer.

Rules:
- Make the tasks varied: different verbs, topics and kinds of work (open questions, classification, editing, \
writing, reasoning, advice, coding, maths, brainstorming).
- A task is one or two sentences in the imperative or as a question.
- About a third of the tasks should need an input (a short passage, a list, a sentence to fix). Write "<noinput>" \
when the task needs none. An input is real content, never just a description of content.
- Nothing that needs seeing, hearing or doing in the world: no images, audio, video, files or actions.
- The output answers the task well, in fewer than 100 words.

Use exactly this format, numbering from 1:

1. Instruction: <the task>
1. Input:
<the input, or <noinput>>
1. Output:
<the answer>
###
"""


def build_prompt(examples: list[dict], count: int = 20) -> str:
    """Our request: the rules, then the seed examples already numbered, then the number the model continues from."""
    text = PROMPT_HEAD.format(count=count)
    for number, task in enumerate(examples, start=1):
        given = task["input"].strip() or "<noinput>"
        text += f"{number}. Instruction: {task['instruction'].strip()}\n{number}. Input:\n{given}\n{number}. Output:\n" \
                f"{task['output'].strip()}\n###\n"
    return text + f"{len(examples) + 1}. Instruction:"


_TASK_START = re.compile(r"(?:^|\n)\s*(?:#+\s*)?(?:\*\*)?\s*(\d+)\s*[.)]\s*(?:\*\*)?\s*Instruction\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
                         re.IGNORECASE)
_FIELD = re.compile(r"\n\s*(?:\*\*)?\s*(?:\d+\s*[.)]\s*)?(?:\*\*)?\s*(Input|Output)\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
                    re.IGNORECASE)


def parse_tasks(answer: str, first_number: int) -> tuple[list[dict], dict]:
    """Tasks from a model's answer (which continues the prompt: its first task has no header of its own).

    Accepts the asked-for format and the usual variations: markdown bold, '##' separators, '<noinput>',
    'No input' or 'N/A' for an empty input. Returns the tasks and the count of pieces rejected, by reason.
    """
    text = f"\n{first_number}. Instruction:" + answer
    starts = list(_TASK_START.finditer(text))
    tasks, rejected = [], {}
    for k, start in enumerate(starts):
        body = text[start.end():starts[k + 1].start() if k + 1 < len(starts) else len(text)]
        body = re.split(r"\n\s*#{2,}\s*(?:\n|$)", body)[0]  # a '###' line ends the task
        fields = list(_FIELD.finditer("\n" + body))
        names = [f.group(1).lower() for f in fields]
        if "output" not in names:
            rejected["no output"] = rejected.get("no output", 0) + 1
            continue
        padded = "\n" + body
        output_field = fields[names.index("output")]
        input_field = fields[names.index("input")] if "input" in names else None
        instruction = _unbold(padded[:fields[0].start()])
        given = _unbold(padded[input_field.end():output_field.start()]) if input_field else ""
        output = _unbold(padded[output_field.end():])
        tasks.append({"instruction": instruction, "input": "" if NO_INPUT.match(given) else given, "output": output})
    return tasks, rejected


def _unbold(text: str) -> str:
    return text.strip().strip("*").strip()


def rejection(task: dict) -> str | None:
    """Why a parsed task is dropped (Stanford's filters), or None."""
    instruction = re.sub(r"\s+", " ", task["instruction"]).strip()
    words = len(instruction.split())
    if words <= 3 or words > 150:
        return "length"
    lowered = instruction.lower()
    if any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in BLACKLIST):
        return "blacklisted word"
    if lowered.startswith("write a program"):
        return "write a program"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with non-ASCII"
    if not task["output"].strip():
        return "empty output"
    return None


# ---- the run ----

@dataclass
class SelfInstructConfig:
    """Every flag of self_instruct.py, with its default."""

    output_dir: str = field(default="./regen", metadata={"help": "regen.jsonl, state.json and summary.json go here"})
    num_instructions: int = field(default=52000, metadata={"help": "how many new rows to keep"})
    model: str = field(default="gpt-4o-mini", metadata={"help": "chat model"})
    base_url: str = field(default="", metadata={"help": "an OpenAI-compatible endpoint (default: OpenAI's)"})
    seed_tasks_path: str = field(default=str(SEED_TASKS), metadata={"help": "self-instruct seed tasks (.jsonl)"})
    num_prompt_instructions: int = field(default=3, metadata={"help": "seed examples shown in each request"})
    request_batch_size: int = field(default=8, metadata={"help": "requests in flight at once"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_tokens: int = field(default=3072, metadata={"help": "longest answer per request"})
    seed: int = field(default=0, metadata={"help": "seed of the choice of seed examples"})
    max_cost_usd: float = field(default=0.0, metadata={"help": "stop cleanly once this much is spent (0: no limit)"})
    price_per_1k_input: float | None = field(default=None, metadata={"help": "USD per 1,000 input tokens (default: known price)"})
    price_per_1k_output: float | None = field(default=None, metadata={"help": "USD per 1,000 output tokens (default: known price)"})
    request_timeout: float = field(default=60.0, metadata={"help": "seconds before a request is retried"})
    max_retries: int = field(default=8, metadata={"help": "retries of a rate-limited or failed request"})
    max_retry_seconds: float = field(default=300.0, metadata={"help": "most seconds one request may take, retries "
                                                                      "and waits included"})
    export: str = field(default="", metadata={"help": "also write the kept rows as an Alpaca .json list here"})


def regenerate(config: SelfInstructConfig, api_key: str | None = None, write=print) -> dict:
    """Run until num_instructions rows are kept (or the cost limit), resuming from output_dir; returns the summary."""
    for name in ("num_instructions", "num_prompt_instructions", "request_batch_size", "max_tokens"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} {value!r}: must be a whole number >= 1")
    spend = make_spend(config.model, config.price_per_1k_input, config.price_per_1k_output, config.max_cost_usd)
    seeds = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
             for r in validate_rows(load_rows(config.seed_tasks_path), skip_bad_rows=False)[0]]
    if len(seeds) < config.num_prompt_instructions:
        raise ValueError(f"--num_prompt_instructions {config.num_prompt_instructions}: the seed file has {len(seeds)} tasks")
    output_dir = Path(config.output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    rows_path, state_path = output_dir / OUTPUT_FILE, output_dir / STATE_FILE
    kept = _read_kept(rows_path)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"requests": 0, "rejected": {}}
    spend.input_tokens, spend.output_tokens = state.get("input_tokens", 0), state.get("output_tokens", 0)
    spend.requests = state["requests"]
    index = RougeIndex()
    for row in seeds + kept:
        index.add(row["instruction"])
    rejected: dict[str, int] = state["rejected"]
    client = Client(config.model, config.base_url, api_key, config.request_timeout, config.max_retries,
                    config.max_retry_seconds)
    started = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.num_instructions, initial=min(len(kept), config.num_instructions), desc="kept", unit="row")

    async def one_request(number: int):
        rng = random.Random(f"{config.seed}-{number}")  # request n always shows the same seeds
        examples = rng.sample(seeds, config.num_prompt_instructions)
        response = await client.chat([{"role": "user", "content": build_prompt(examples)}],
                                     temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens)
        return examples, response

    async def run():
        nonlocal kept
        stop_reason, barren_batches = None, 0
        try:
            while len(kept) < config.num_instructions:
                if spend.exhausted:
                    stop_reason = "cost limit"
                    break
                if barren_batches == MAX_BARREN_BATCHES:  # the model (or server) is not producing usable tasks
                    stop_reason = f"{MAX_BARREN_BATCHES} batches in a row kept nothing"
                    break
                first = spend.requests
                results = await asyncio.gather(*(one_request(first + i) for i in range(config.request_batch_size)),
                                               return_exceptions=True)
                accepted = []
                for result in results:
                    if isinstance(result, FatalAPIError):
                        continue  # raised below, once this batch's good answers are kept
                    if isinstance(result, BaseException):
                        _count(rejected, f"request failed: {type(result).__name__}")
                        spend.requests += 1
                        continue
                    examples, response = result
                    spend.add(response.usage)
                    choice = response.choices[0]
                    tasks, parse_rejects = parse_tasks(choice.message.content or "", len(examples) + 1)
                    for reason, count in parse_rejects.items():
                        _count(rejected, reason, count)
                    if choice.finish_reason == "length" and tasks:
                        tasks.pop()  # the last task was cut off mid-way
                        _count(rejected, "cut off by max_tokens")
                    for task in tasks:
                        reason = rejection(task)
                        if reason is None:
                            score, _ = index.most_similar(task["instruction"])
                            reason = "ROUGE-L > 0.7" if score > ROUGE_THRESHOLD else None
                        if reason:
                            _count(rejected, reason)
                            continue
                        if len(kept) + len(accepted) >= config.num_instructions:
                            break
                        index.add(task["instruction"])
                        accepted.append(task)
                barren_batches = 0 if accepted else barren_batches + 1
                append_jsonl(rows_path, accepted)  # a kill loses at most the batch in flight
                kept = kept + accepted
                _write_state(state_path, spend, rejected)
                fatal = next((r for r in results if isinstance(r, FatalAPIError)), None)
                if fatal:
                    raise fatal
                client.stop_if_every_request_failed(results)
                bar.update(len(accepted))
                bar.set_postfix(requests=spend.requests, rejected=sum(rejected.values()),
                                usd=f"{spend.usd:.4f}" if spend.usd is not None else "?")
        finally:
            await client.close()
        return stop_reason or "target reached"

    try:
        stop_reason = asyncio.run(run())
    finally:
        bar.close()
    summary = {"kept": len(kept), "target": config.num_instructions, "stopped": stop_reason,
               "rejected": rejected, "retries": client.retries, "spend": spend.to_dict(),
               "seconds": time.time() - started, "arguments": asdict(config)}
    write_text_atomically(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    if config.export:
        write_text_atomically(Path(config.export).expanduser(), json.dumps(kept, indent=1, ensure_ascii=False))
    write(f"kept {len(kept)} of {config.num_instructions} rows ({stop_reason}); {spend.requests} requests, "
          f"{spend.usd if spend.usd is not None else 'unknown'} USD; {output_dir / OUTPUT_FILE}")
    return summary


def _count(counter: dict, reason: str, n: int = 1) -> None:
    counter[reason] = counter.get(reason, 0) + n


def _read_kept(path: Path) -> list[dict]:
    """Rows kept by earlier runs (a line cut by a kill is dropped: its row is generated anew), first copy of each."""
    rows, seen = [], set()
    for row in resume_jsonl(path):
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            rows.append(row)
    return rows


def _write_state(path: Path, spend, rejected: dict) -> None:
    write_text_atomically(path, json.dumps({"requests": spend.requests, "input_tokens": spend.input_tokens,
                                            "output_tokens": spend.output_tokens, "rejected": rejected}))


# ---- clean: what AlpacaDataCleaned learned ----

_MERGED_TASK = re.compile(r"\n*\s*#{1,3}\s*\n+\s*\d+\s*\.\s*Instruction\s*:", re.IGNORECASE)
_URL_ONLY = re.compile(r"^\s*<?https?://\S+>?\s*$", re.IGNORECASE)
_ATTACHMENT = re.compile(r"<\s*(image|img|photo|picture|file|attachment)\s*>|\[\s*(image|photo|attachment)\s*\]|"
                         r"^\s*(see |refer to )?(the )?(attached|following) (image|photo|picture|file|document)",
                         re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """The cleaned rows and how many each rule touched."""
    counts = {"no-input marker normalised": 0, "empty or N/A output dropped": 0, "merged second task split": 0,
              "URL or attachment input dropped": 0, "control characters stripped": 0, "exact duplicate dropped": 0}
    pending, out, seen = list(rows), [], set()
    while pending:
        row = dict(pending.pop(0))
        for key in ("instruction", "input", "output"):
            value = row.get(key) or ""
            stripped = _CONTROL.sub("", value)
            if stripped != value:
                counts["control characters stripped"] += 1
            row[key] = stripped
        if row["input"] and NO_INPUT.match(row["input"]):
            row["input"] = ""
            counts["no-input marker normalised"] += 1
        merged = _MERGED_TASK.search(row["output"])
        if merged:
            counts["merged second task split"] += 1
            tail = row["output"][merged.start():]
            row["output"] = row["output"][:merged.start()].strip()
            number = re.search(r"(\d+)\s*\.\s*Instruction", tail)
            extra, _ = parse_tasks(tail[number.end() + 1:] if number else "", int(number.group(1)) if number else 1)
            pending[:0] = [t for t in extra if t["instruction"] and t["output"]]
        if not row["output"].strip() or re.fullmatch(r"\s*(n/?a|none|<nooutput>)\.?\s*", row["output"], re.IGNORECASE):
            counts["empty or N/A output dropped"] += 1
            continue
        if row["input"] and (_URL_ONLY.match(row["input"]) or _ATTACHMENT.search(row["input"])):
            counts["URL or attachment input dropped"] += 1
            continue
        key = (row["instruction"], row["input"], row["output"])
        if key in seen:
            counts["exact duplicate dropped"] += 1
            continue
        seen.add(key)
        out.append({"instruction": row["instruction"], "input": row["input"], "output": row["output"]})
    return out, counts


def clean_file(input_path: str, output_path: str, write=print) -> dict:
    rows, _ = validate_rows(load_rows(input_path), skip_bad_rows=False)
    cleaned, counts = clean_rows(rows)
    write_text_atomically(Path(output_path).expanduser(), json.dumps(cleaned, indent=1, ensure_ascii=False))
    write(f"{len(rows)} rows in, {len(cleaned)} out: " + "; ".join(f"{k} {v}" for k, v in counts.items()))
    return {"rows_in": len(rows), "rows_out": len(cleaned), "rules": counts}
