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
