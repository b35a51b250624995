"""Regenerate Alpaca-style data through an OpenAI-compatible API, or clean a data file: `python self_instruct.py --help`."""

from alpaca_lora.console import self_instruct

if __name__ == "__main__":
    self_instruct()
