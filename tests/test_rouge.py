"""rouge.py against rouge_score, on real Alpaca instructions from ../shared."""

import json
import random

from conftest import ALPACA_CLEANED, ALPACA_ORIGINAL, needs_shared

from alpaca_lora.rouge import RougeIndex, rouge_l, rouge_tokens


def _instruction_pairs(limit):
    rows = json.loads(ALPACA_CLEANED.read_text()) + json.loads(ALPACA_ORIGINAL.read_text())
    instructions = [r["instruction"] for r in rows]
    rng = random.Random(0)
    pairs = [(rng.choice(instructions), rng.choice(instructions)) for _ in range(limit)]
    # near-duplicates too, so that decisions on both sides of 0.7 are tested
    for text in instructions[:limit // 4]:
        words = text.split()
        if len(words) > 4:
            mutated = list(words)
            mutated[rng.randrange(len(words))] = rng.choice(["the", "a", "new", "this"])
            pairs.append((text, " ".join(mutated)))
    return instructions, pairs


@needs_shared(ALPACA_CLEANED)
def test_rouge_l_equals_rouge_score_on_real_instruction_pairs():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    _, pairs = _instruction_pairs(3000)
    above = 0
    for target, prediction in pairs:
        expected = scorer.score(target, prediction)["rougeL"].fmeasure
        assert rouge_l(rouge_tokens(target), rouge_tokens(prediction)) == expected
        above += expected > 0.7
    assert above > 100  # both sides of the threshold are exercised


@needs_shared(ALPACA_CLEANED)
def test_the_index_makes_exactly_the_decisions_of_the_full_loop():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    instructions, pairs = _instruction_pairs(400)
    index, kept_so_far = RougeIndex(), []
    candidates = instructions[:600] + [b for _, b in pairs[-300:]]
    for candidate in candidates:
        expected = any(scorer.score(candidate, old)["rougeL"].fmeasure > 0.7 for old in kept_so_far)
        score, _ = index.most_similar(candidate)
        assert (score > 0.7) == expected, candidate
        if not expected:
            index.add(candidate)
            kept_so_far.append(candidate)
    assert 0 < len(kept_so_far) < len(candidates)
