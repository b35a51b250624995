"""Fine-tune a LLaMA-family model with LoRA on Alpaca-format data: `python finetune.py --help`."""

from alpaca_lora.console import finetune

if __name__ == "__main__":
    finetune()
