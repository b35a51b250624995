"""demo.py: the tiny base the README's first command builds, with the precision rule training uses."""

import pytest

from alpaca_lora import demo


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_pretraining_follows_the_bf16_rule_and_reports_as_it_goes(tmp_path, capsys, monkeypatch, fast_bf16):
    monkeypatch.setattr(demo, "fast_bf16_available", lambda device: fast_bf16)
    used = []
    real_autocast = demo.torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True):
        used.append(enabled)
        return real_autocast(device_type, dtype=dtype, enabled=enabled)
    monkeypatch.setattr(demo.torch, "autocast", recording_autocast)
    monkeypatch.setattr(demo, "time", type("Clock", (), {"monotonic": staticmethod(iter(range(0, 1000, 11)).__next__)}))
    demo.build_demo_model(demo.DemoConfig(output_dir=str(tmp_path / "m"), vocab_size=512, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          pretrain_steps=4))
    out = capsys.readouterr().out
    assert f"demo pretraining: 4 steps in {'bf16' if fast_bf16 else 'fp32'}" in out
    assert used == [fast_bf16] * 4
    # 11 s pass between two looks at the clock: more than the 10 s between reports, so every step reports
    assert [f"demo pretraining step {n}/4" in out for n in range(1, 5)] == [True] * 4


@pytest.mark.parametrize("family", [name for name in demo.FAMILIES if name != "llama"])
def test_a_demo_of_each_family_trains_on_the_chat_sample_with_its_own_template(family, tmp_path):
    """The README's chat recipe on a CPU: the demo base carries its family's chat template, so conversation data
    needs no --chat_template; the adapter stops at the template's end-of-turn token."""
    from conftest import REPO, tiny_config

    from alpaca_lora.generate import Generator, Sampling
    from alpaca_lora.train import train

    base = demo.build_demo_model(demo.DemoConfig(output_dir=str(tmp_path / "base"), family=family, vocab_size=400,
                                                 hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, pretrain_steps=0))
    result = train(tiny_config(base, REPO / "data" / "chat_sample.jsonl", tmp_path / "adapter", max_steps=1,
                               batch_size=4, micro_batch_size=2, val_set_size=4))
    assert result.summary.chat_template["name"] == "tokenizer" and result.summary.data.train_rows == 84
    generator = Generator(lora_weights=str(tmp_path / "adapter"), bf16=False, device="cpu")
    marker = {"llama3": "<|eot_id|>", "mistral": "</s>", "qwen3": "<|im_end|>",
              "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}[family]
    assert generator.stop_ids[0] == generator.tokenizer.convert_tokens_to_ids(marker)
    answer = generator.answer([generator.instruction_ids("Name a colour.")], Sampling(temperature=0, max_new_tokens=4))
    assert answer[0].completion_tokens >= 1
