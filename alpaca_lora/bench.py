"""Benchmark helpers: LLaMA-shaped models with random weights, for measuring speed without a download."""

from pathlib import Path


def random_llama(folder: Path, shape: dict, tokenizer_model: Path | None, dtype: str = "float32") -> Path:
    """A LLaMA-shaped model with random weights in `folder` (reused if already there), with the real LLaMA
    tokenizer from `tokenizer_model` or, where that file is absent, the demo tokenizer (a far smaller vocabulary).
    Weights are drawn on a GPU where there is one (a 7B model's init takes minutes on a CPU) and saved in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .demo import DemoConfig, build_demo_model, save_llama_tokenizer
    from .files import staged

    if (folder / "config.json").exists():
        return folder
    with staged(folder) as staging:  # a half-built model is never taken for a finished one
        if tokenizer_model is not None and tokenizer_model.exists():
            tokenizer = save_llama_tokenizer(staging, tokenizer_model.read_bytes())
        else:
            if tokenizer_model is not None:
                print(f"note: {tokenizer_model} is absent; using the demo tokenizer (vocabulary far below 32,000)")
            build_demo_model(DemoConfig(output_dir=str(staging), pretrain_steps=0))
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(staging)
        config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=shape["num_attention_heads"],
                             max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **shape)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(staging, max_shard_size="5GB")
    return folder
