"""Evaluate: held-out loss, and Alpaca's own test — blind pairwise comparison against reference answers.

    loss    response-only loss and perplexity of base + adapter on Alpaca rows or conversations (the adapter's
            template, loss on the assistant turns as in training)
    answer  the adapter's answers to an evaluation file (generate.py's batch mode: resumable)
    judge   each instruction's two answers shown, in a seeded random order, to a judge model (any
            OpenAI-compatible endpoint) or to a person at the terminal; verdicts cached per pair so a rerun
            resumes; a report of wins, ties and losses with a 95% interval, split by whether there is an input
"""

import asyncio
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .api import Client, FatalAPIError, make_spend
from .data import is_conversation, load_rows, rendering_problem, tokenize_rows, validate_rows
from .files import append_jsonl, resume_jsonl, write_text_atomically
from .batching import PassLayout
from .evaluation import evaluate_loss
from .generate import Generator, Sampling
from .generate_cli import answer_file
from .loss import LossModule, response_only_loss

JUDGE_PROMPT = """You are comparing two answers to the same request, written by two different assistants. Decide which \
answer serves the person better: correct, helpful, complete and clear, and following the request (and its input, \
if there is one). Length is not a merit by itself. The order of the answers says nothing about their quality.

Request:
{instruction}
{input_block}
Answer A:
{answer_a}

Answer B:
{answer_b}

First explain your judgement in two or three sentences. Then, on the last line, write exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""


# ---- loss ----

def heldout_loss(lora_weights: str = "", data_path: str = "", base_model: str = "", cutoff_len: int = 512,
                 micro_batch_size: int = 4, bf16: bool | None = None, write=print) -> dict:
    """Mean loss per response token (and its perplexity) of base + adapter on Alpaca rows or conversations, e.g. the
    validation_rows.json that training held out; rendered with the adapter's chat template where it has one."""
    from accelerate import Accelerator

    if not data_path:
        raise ValueError("--data_path is required: Alpaca rows, e.g. the adapter folder's validation_rows.json")

    generator = Generator(base_model, lora_weights, "", bf16=bf16)  # device chosen as everywhere: CUDA, MPS, CPU
    loaded = load_rows(data_path)
    rows, _ = validate_rows(loaded, skip_bad_rows=False)
    if is_conversation(rows) and generator.chat_template is None:
        raise ValueError(f"--data_path {data_path}: holds conversations, and the adapter was trained without a chat "
                         "template; evaluate it on Alpaca rows")
    template = generator.chat_template or generator.template
    if generator.chat_template:  # a row the template refuses is named, as in training
        rows, _ = validate_rows(loaded, False, rendering_problem(generator.chat_template, generator.tokenizer))
    tokenized = tokenize_rows(rows, generator.tokenizer, template, cutoff_len, train_on_inputs=False)
    # packed rows of up to cutoff_len tokens: the same loss as padded rows (tests/test_packing.py), less padding
    layout = PassLayout(rows_per_pass=micro_batch_size, row_length=cutoff_len, packing=True)
    model = generator.model
    autocast = (torch.autocast(generator.device.type, dtype=torch.bfloat16)
                if next(model.parameters()).dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False))
    loss = evaluate_loss(LossModule(model, response_only_loss), tokenized.examples, layout,
                         generator.tokenizer.pad_token_id, Accelerator(), autocast)
    result = {"loss": loss, "perplexity": math.exp(loss), "rows": len(rows), "examples": len(tokenized.examples),
              "truncated": tokenized.num_truncated, "target_tokens": sum(e.num_targets for e in tokenized.examples)}
    write(f"loss {loss:.4f} per response token, perplexity {math.exp(loss):.3f} "
          f"({result['examples']} examples, {result['truncated']} truncated at cutoff_len {cutoff_len})")
    return result


# ---- answer ----

def answer_eval_file(lora_weights: str = "", eval_file: str = "", output_file: str = "", base_model: str = "",
                     batch_size: int = 8, max_new_tokens: int = 512, temperature: float = 0.0, seed: int | None = 0,
                     write=print) -> int:
    """Answers to every instruction of an evaluation file (self-instruct or Alpaca format), as JSONL; resumable."""
    if not (eval_file and output_file):
        raise ValueError("--eval_file and --output_file are required")
    generator = Generator(base_model, lora_weights)
    sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens).validated(100_000)
    return answer_file(generator, eval_file, output_file, sampling, batch_size, seed, progress=write)


# ---- judge ----

def load_answers(path: str, answer_key: str | None = None) -> dict[tuple[str, str], str]:
    """(instruction, input) -> answer, from our JSONL (output) or a self-instruct predictions file (response)."""
    answers = {}
    for number, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: malformed JSON at line {number} column {error.colno}") from None
        key = answer_key or next((k for k in ("output", "response") if isinstance(record.get(k), str)), None)
        if not isinstance(record.get("instruction"), str) or key is None or not isinstance(record.get(key), str):
            raise ValueError(f"{path}: row {number} needs 'instruction' and an 'output' or 'response' string")
        answers[(record["instruction"].strip(), (record.get("input") or "").strip())] = record[key]
    return answers


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's last 'Verdict:' line; None if there is none."""
    found = re.findall(r"verdict\s*:\s*\**\s*(a|b|tie)\b", text or "", re.IGNORECASE)
    return found[-1].upper().replace("TIE", "tie") if found else None


def pair_order(seed: int, key: tuple[str, str]) -> bool:
    """True when ours is shown as A: a coin per pair, seeded, independent of file order."""
    return random.Random(f"{seed}|{key[0]}|{key[1]}").random() < 0.5


@dataclass
class JudgeConfig:
    answers: str = field(default="", metadata={"help": "our answers (JSONL from 'answer' or generate.py)"})
    reference: str = field(default="", metadata={"help": "reference answers, e.g. text-davinci-003_predictions.jsonl"})
    judge: str = field(default="model", metadata={"help": "model (an LLM judge) or human (you, at the terminal)"})
    judge_model: str = field(default="gpt-4o-mini", metadata={"help": "the judge's model name"})
    base_url: str = field(default="", metadata={"help": "an OpenAI-compatible endpoint (default: OpenAI's)"})
    output_dir: str = field(default="./judgement", metadata={"help": "verdict cache and the report go here"})
    seed: int = field(default=0, metadata={"help": "seed of the per-pair order"})
    both_orders: bool = field(default=False, metadata={"help": "judge each pair both ways; a disagreement is a tie"})
    request_batch_size: int = field(default=8, metadata={"help": "judge requests in flight"})
    max_cost_usd: float = field(default=0.0, metadata={"help": "stop cleanly at this spend (0: no limit)"})
    price_per_1k_input: float | None = field(default=None, metadata={"help": "USD per 1,000 input tokens"})
    price_per_1k_output: float | None = field(default=None, metadata={"help": "USD per 1,000 output tokens"})
    request_timeout: float = field(default=60.0, metadata={"help": "seconds before a request is retried"})
    max_retries: int = field(default=8, metadata={"help": "retries of a rate-limited or failed request"})
    max_retry_seconds: float = field(default=300.0, metadata={"help": "most seconds one request may take, retries "
                                                                      "and waits included"})


def judge(config: JudgeConfig, api_key: str | None = None, read=input, write=print) -> dict:
    if config.judge not in ("model", "human"):
        raise ValueError(f"--judge {config.judge!r}: use model or human")
    for flag in ("answers", "reference"):
        if not Path(getattr(config, flag)).expanduser().is_file():
            raise ValueError(f"--{flag} {getattr(config, flag)!r}: no such file")
    ours, reference = load_answers(config.answers), load_answers(config.reference)
    pairs = sorted(set(ours) & set(reference))
    missing, extra = sorted(set(ours) - set(reference)), sorted(set(reference) - set(ours))
    if missing or extra:
        write(f"note: {len(missing)} of our answers have no reference and {len(extra)} references have no answer "
              f"of ours; they are left out and listed in the report")
    if not pairs:
        raise ValueError(f"--answers {config.answers}: no instruction in common with --reference {config.reference}")
    output_dir = Path(config.output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_path = output_dir / "verdicts.jsonl"
    cache = _read_cache(cache_path)
    jobs = [(key, ours_first) for key in pairs
            for ours_first in ((True, False) if config.both_orders else (pair_order(config.seed, key),))
            if (key[0], key[1], ours_first) not in cache]
    spend = None
    if jobs and config.judge == "human":
        _judge_by_hand(jobs, ours, reference, cache, cache_path, read, write)
    elif jobs:
        spend = make_spend(config.judge_model, config.price_per_1k_input, config.price_per_1k_output,
                           config.max_cost_usd)
        client = Client(config.judge_model, config.base_url, api_key, config.request_timeout, config.max_retries,
                        config.max_retry_seconds)
        asyncio.run(_judge_by_model(jobs, ours, reference, cache, cache_path, client, spend, config.request_batch_size))
    report = _report(pairs, cache, config, missing, extra, spend)
    write_text_atomically(output_dir / "report.json", json.dumps(report, indent=2))
    write_text_atomically(output_dir / "report.md", _markdown(report))
    write(_markdown(report))
    return report


def _read_cache(path: Path) -> dict:
    return {(record["instruction"], record["input"], record["ours_first"]): record for record in resume_jsonl(path)}


def _remember(cache: dict, path: Path, key, ours_first: bool, verdict: str | None, raw: str) -> None:
    """A shown-order verdict turned into ours/reference terms, cached and appended at once."""
    if verdict is None:
        outcome = None
    elif verdict == "tie":
        outcome = "tie"
    else:
        outcome = "win" if (verdict == "A") == ours_first else "loss"
    record = {"instruction": key[0], "input": key[1], "ours_first": ours_first, "verdict": verdict,
              "outcome": outcome, "judgement": raw}
    cache[(key[0], key[1], ours_first)] = record
    append_jsonl(path, [record])


def _shown(key, ours_first: bool, ours: dict, reference: dict) -> tuple[str, str]:
    return (ours[key], reference[key]) if ours_first else (reference[key], ours[key])


async def _judge_by_model(jobs, ours, reference, cache, cache_path, client: Client, spend, batch_size: int) -> None:
    try:
        for start in range(0, len(jobs), batch_size):
            if spend.exhausted:
                break
            batch = jobs[start:start + batch_size]

            async def one(key, ours_first):
                answer_a, answer_b = _shown(key, ours_first, ours, reference)
                prompt = JUDGE_PROMPT.format(instruction=key[0], answer_a=answer_a, answer_b=answer_b,
                                             input_block=f"\nInput:\n{key[1]}\n" if key[1] else "")
                return await client.chat([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=400)

            results = await asyncio.gather(*(one(k, o) for k, o in batch), return_exceptions=True)
            for (key, ours_first), result in zip(batch, results):
                if isinstance(result, BaseException):
                    continue  # retries exhausted: left uncached, a rerun asks again
                spend.add(result.usage)
                text = result.choices[0].message.content or ""
                _remember(cache, cache_path, key, ours_first, parse_verdict(text), text)
            fatal = next((r for r in results if isinstance(r, FatalAPIError)), None)
            if fatal:  # bad key, unknown model: after the batch's verdicts are kept
                raise fatal
            client.stop_if_every_request_failed(results)
    finally:
        await client.close()


def _judge_by_hand(jobs, ours, reference, cache, cache_path, read, write) -> None:
    write(f"{len(jobs)} pairs to judge. For each: a, b or t (tie), then Enter; q to stop (a rerun resumes).")
    for number, (key, ours_first) in enumerate(jobs, start=1):
        answer_a, answer_b = _shown(key, ours_first, ours, reference)
        write(f"\n[{number}/{len(jobs)}] Instruction:\n{key[0]}\n" + (f"Input:\n{key[1]}\n" if key[1] else "") +
              f"\n--- Answer A ---\n{answer_a}\n\n--- Answer B ---\n{answer_b}\n")
        while True:
            try:
                choice = read("Better? [a/b/t/q] ").strip().lower()
            except EOFError:
                return
            if choice == "q":
                return
            if choice in ("a", "b", "t"):
                verdict = {"a": "A", "b": "B", "t": "tie"}[choice]
                _remember(cache, cache_path, key, ours_first, verdict, "human")
                break


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _report(pairs, cache, config: JudgeConfig, missing, extra, spend) -> dict:
    outcomes = {}
    for key in pairs:
        orders = (True, False) if config.both_orders else (pair_order(config.seed, key),)
        results = [cache.get((key[0], key[1], o), {}).get("outcome") for o in orders]
        if any(r is None for r in results):
            outcomes[key] = None  # not judged yet, or the verdict could not be read
        elif len(set(results)) == 1:
            outcomes[key] = results[0]
        else:
            outcomes[key] = "tie"  # the judge changed its mind with the order: position bias, not preference

    def tally(keys):
        counted = [outcomes[k] for k in keys if outcomes[k] is not None]
        wins, losses, ties = counted.count("win"), counted.count("loss"), counted.count("tie")
        # ties count half, as in Alpaca's comparison; the interval is Wilson's on that score
        score = (wins + ties / 2) / len(counted) if counted else None
        low, high = wilson_interval(wins + ties / 2, len(counted)) if counted else (None, None)
        return {"judged": len(counted), "wins": wins, "ties": ties, "losses": losses, "win_rate": score,
                "ci95": [low, high]}

    return {"all": tally(pairs), "with_input": tally([k for k in pairs if k[1]]),
            "without_input": tally([k for k in pairs if not k[1]]),
            "unjudged": sum(outcomes[k] is None for k in pairs), "pairs": len(pairs),
            "answers_without_reference": [list(k) for k in missing], "references_without_answer": [list(k) for k in extra],
            "judge": config.judge if config.judge == "human" else config.judge_model,
            "spend": spend.to_dict() if spend else None, "arguments": asdict(config)}


def _markdown(report: dict) -> str:
    lines = [f"Judge: {report['judge']}; {report['pairs']} pairs, {report['unjudged']} without a verdict.", "",
             "| instructions | judged | wins | ties | losses | win rate (ties half) | 95% interval |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("all", "with_input", "without_input"):
        t = report[name]
        rate = f"{t['win_rate']:.1%}" if t["win_rate"] is not None else "-"
        ci = f"{t['ci95'][0]:.1%} – {t['ci95'][1]:.1%}" if t["win_rate"] is not None else "-"
        lines.append(f"| {name.replace('_', ' ')} | {t['judged']} | {t['wins']} | {t['ties']} | {t['losses']} | "
                     f"{rate} | {ci} |")
    return "\n".join(lines)
