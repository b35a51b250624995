"""The ROUGE-L novelty check of self_instruct.py: our index against the per-candidate rouge_score loop.

    python bench/rouge_check.py [--sizes 10000 50000]

A run checks every candidate against every instruction kept before it (quadratic). Candidates: the real
Alpaca instructions from ../shared (8,253), then as many variants as needed: 80% new instructions (a real
one with half its words replaced by words drawn at their real frequency, so most are kept and the kept set
grows as in a real run) and 20% near-duplicates (one word swapped, dropped or added: both sides of 0.7 occur). Ours runs the whole check; the
rouge_score loop (what Stanford's script does, minus its process pool) would take hours, so its time is the
measured cost per pair times the number of pairs the same run compares, and the decisions of both are
compared on a sample. Prints a table and writes bench/results/rouge_check.json.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))


def candidates(count: int) -> list[str]:
    files = [SHARED / "data" / "alpaca_sample_cleaned.json", SHARED / "data" / "alpaca_sample_original.json"]
    real = [r["instruction"] for f in files if f.exists() for r in json.loads(f.read_text())]
    if not real:
        print("note: ../shared is absent; using the project's seed tasks")
        real = [json.loads(line)["instruction"] for line in (REPO / "data" / "seed_tasks.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    out = list(real)
    corpus_words = [w for text in real for w in text.split()]  # drawn by their real frequency
    while len(out) < count:
        words = rng.choice(real).split()
        if rng.random() < 0.8:  # a new instruction: half its words replaced, real length and word frequencies
            words = [rng.choice(corpus_words) if rng.random() < 0.5 else w for w in words]
        else:  # a near-duplicate: one word swapped, dropped or added
            position = rng.randrange(len(words))
            if rng.random() < 0.5:
                words[position] = rng.choice(corpus_words)
            elif len(words) > 4:
                del words[position]
            else:
                words.insert(position, rng.choice(corpus_words))
        out.append(" ".join(words))
    rng.shuffle(out)
    return out[:count]


def run_index(texts: list[str]):
    from alpaca_lora.rouge import ROUGE_THRESHOLD, RougeIndex

    index, decisions = RougeIndex(), []
    started = time.perf_counter()
    for text in texts:
        score, _ = index.most_similar(text)
        keep = score <= ROUGE_THRESHOLD
        decisions.append(keep)
        if keep:
            index.add(text)
    return time.perf_counter() - started, decisions


def rouge_score_seconds_per_pair(texts: list[str], pairs: int = 20000) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    sample = [(rng.choice(texts), rng.choice(texts)) for _ in range(pairs)]
    started = time.perf_counter()
    for a, b in sample:
        scorer.score(a, b)
    return (time.perf_counter() - started) / pairs


def check_decisions(texts: list[str], decisions: list[bool], sample: int = 300) -> int:
    """Recompute the decision of `sample` candidates with rouge_score against everything kept before them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(2)
    mismatches = 0
    for i in rng.sample(range(len(texts)), sample):
        kept_before = [t for t, keep in zip(texts[:i], decisions[:i]) if keep]
        expected = all(scorer.score(texts[i], old)["rougeL"].fmeasure <= 0.7 for old in kept_before)
        mismatches += expected != decisions[i]
    return mismatches


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        texts = candidates(size)
        seconds, decisions = run_index(texts)
        kept = sum(decisions)
        # the loop compares candidate i with every instruction kept before it
        pairs, running = 0, 0
        for keep in decisions:
            pairs += running
            running += keep
        per_pair = rouge_score_seconds_per_pair(texts)
        mismatches = check_decisions(texts, decisions)
        rows.append({"candidates": size, "kept": kept, "pairs": pairs, "index_seconds": seconds,
                     "rouge_score_seconds_per_pair": per_pair, "rouge_score_loop_seconds_estimated": pairs * per_pair,
                     "speedup": pairs * per_pair / seconds, "decisions_checked": 300, "mismatches": mismatches})
        print(f"{size} candidates: index {seconds:.1f} s, rouge_score loop ~{pairs * per_pair / 3600:.1f} h "
              f"({pairs:,} pairs at {per_pair * 1e6:.0f} us), {mismatches} mismatches in 300 checked", flush=True)
    (RESULTS / "rouge_check.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print("| candidates | kept | pairs compared | our index | rouge_score loop (estimated) | speedup | decisions checked |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['candidates']:,} | {r['kept']:,} | {r['pairs']:,} | {r['index_seconds']:.1f} s | "
              f"{r['rouge_score_loop_seconds_estimated'] / 3600:.1f} h | {r['speedup']:.0f}x | "
              f"{r['decisions_checked'] - r['mismatches']}/{r['decisions_checked']} equal |")
