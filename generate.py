"""Answer instructions with a base model + LoRA adapter: `python generate.py --help`."""

from alpaca_lora.console import generate

if __name__ == "__main__":
    generate()
