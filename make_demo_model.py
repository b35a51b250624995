"""Build the tiny local demo model (no download): `python make_demo_model.py --output_dir ./demo-llama`."""

from alpaca_lora.console import make_demo_model

if __name__ == "__main__":
    make_demo_model()
