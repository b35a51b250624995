"""ROUGE-L, as rouge_score computes it (no stemming), and an index that answers "is this instruction too
similar to any kept one?" without computing every pair's LCS.

Stanford's generate_instruction.py keeps a new instruction only if its ROUGE-L F-measure with every instruction
kept so far is at most 0.7: quadratic in the data, hours for 52K rows. The index makes exactly rouge_score's
decisions (tests/test_rouge.py) but bounds each pair's LCS from above first, so the exact LCS runs only on
the few pairs that could exceed the threshold.
"""

import re

import numpy as np

ROUGE_THRESHOLD = 0.7
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, non-alphanumerics become spaces, split."""
    return [t for t in _NON_ALPHANUMERIC.sub(" ", text.lower()).split() if t]


def lcs_length(a: list, b: list) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(target: list, prediction: list) -> float:
    """rouge_score's rougeL F-measure, the same arithmetic in the same order."""
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


class RougeIndex:
    """Kept instructions, and the question: is a candidate's ROUGE-L with any of them above the threshold?

    F = 2 LCS / (m + n) > 0.7 needs LCS > 0.35 (m + n). LCS is at most min(m, n), and at most the number of the
    candidate's tokens that occur in the other instruction, which the postings give for all instructions at
    once (one bincount). Pairs that fail either bound cannot exceed the threshold; the exact LCS decides the rest.
    """

    def __init__(self):
        self.tokens: list[list[str]] = []
        self.lengths = np.zeros(0, dtype=np.int64)
        self.postings: dict[str, list[int]] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self):
        return len(self.tokens)

    def add(self, instruction: str) -> None:
        tokens = rouge_tokens(instruction)
        index = len(self.tokens)
        self.tokens.append(tokens)
        self.lengths = np.append(self.lengths, len(tokens))
        for token in set(tokens):
            self.postings.setdefault(token, []).append(index)
            self._arrays.pop(token, None)

    def _posting(self, token: str) -> np.ndarray:
        array = self._arrays.get(token)
        if array is None:
            array = self._arrays[token] = np.asarray(self.postings.get(token, ()), dtype=np.int64)
        return array

    def most_similar(self, instruction: str) -> tuple[float, int | None]:
        """The largest ROUGE-L over the pairs that could exceed the threshold (0.0 if none can), and which one."""
        candidate = rouge_tokens(instruction)
        if not candidate or not self.tokens:
            return 0.0, None
        counts = {}
        for token in candidate:
            counts[token] = counts.get(token, 0) + 1
        postings = [(self._posting(token), count) for token, count in counts.items()]
        postings = [(p, c) for p, c in postings if len(p)]
        if not postings:
            return 0.0, None
        # an upper bound on each instruction's LCS with the candidate: the candidate's tokens it contains
        shared = np.bincount(np.concatenate([p for p, _ in postings]),
                             weights=np.concatenate([np.full(len(p), c, dtype=np.float64) for p, c in postings]),
                             minlength=len(self.tokens))
        m, n = len(candidate), self.lengths
        needed = ROUGE_THRESHOLD / 2 * (m + n) - 1e-9
        possible = np.nonzero((shared >= needed) & (np.minimum(m, n) >= needed))[0]
        best, best_index = 0.0, None
        for j in possible:
            score = rouge_l(candidate, self.tokens[j])
            if score > best:
                best, best_index = score, int(j)
        return best, best_index
