"""Merge a LoRA adapter into its base and export it (HF, GGUF, Meta): `python export_hf.py --help`."""

from alpaca_lora.console import export

if __name__ == "__main__":
    export()
