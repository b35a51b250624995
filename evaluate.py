"""Evaluate an adapter: held-out loss, answers to an evaluation set, blind pairwise judging: `python evaluate.py --help`."""

from alpaca_lora.console import evaluate

if __name__ == "__main__":
    evaluate()
