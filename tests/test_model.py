from pathlib import Path

import pytest
import torch

from alpaca_lora import model as model_module
from alpaca_lora.model import attach_lora, fast_bf16_available, load_model, load_tokenizer

CPU = torch.device("cpu")
HAS_AVX512_BF16 = "avx512_bf16" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")


def test_tokenizer_pads_with_unk_never_eos(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.is_fast


def test_missing_base_model_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--base_model .*/absent: no such folder"):
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"--base_model ./absent: no such folder"):
        load_model("./absent", None, False, CPU)


def _lora(model, dropout=0.0, targets=("q_proj", "v_proj"), quantized=False):
    torch.manual_seed(0)
    return attach_lora(model, r=4, alpha=8, dropout=dropout, target_modules=list(targets), use_dora=False,
                       use_rslora=False, gradient_checkpointing=False, quantized=quantized)


def _lora_grads(peft_model, input_ids):
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def _nudge_lora_b(peft_model):
    """lora_B starts at zero, which would hide wrong A gradients; give it values."""
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))


def _grads_after_an_eval_pass(tiny_base):
    peft_model = _lora(load_model(str(tiny_base), "4bit", False, CPU), quantized=True)
    _nudge_lora_b(peft_model)
    input_ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(peft_model, input_ids)
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=input_ids)
    return before, _lora_grads(peft_model, input_ids)


def test_4bit_lora_gradients_survive_an_evaluation_pass(tiny_base):
    before, after = _grads_after_an_eval_pass(tiny_base)
    assert len(before) == 8  # A and B of q_proj and v_proj in 2 layers
    for name in before:
        assert before[name] is not None and after[name] is not None, name
        assert before[name].abs().sum() > 0, name
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the bitsandbytes repacking bug shows only on AVX512-BF16 CPUs")
def test_without_the_opt_out_bitsandbytes_breaks_4bit_gradients(tiny_base, monkeypatch):
    """The control for the test above: if this starts failing, bitsandbytes has fixed the bug and
    model._keep_4bit_cpu_weights_unpacked can go."""
    monkeypatch.setattr(model_module, "_keep_4bit_cpu_weights_unpacked", lambda model: None)
    before, after = _grads_after_an_eval_pass(tiny_base)
    assert any(after[n] is None or not torch.allclose(after[n], before[n]) for n in before)


def test_8bit_base_trains_its_lora_weights(tiny_base):
    base = load_model(str(tiny_base), "8bit", False, CPU)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    peft_model = _lora(base, quantized=True)
    _nudge_lora_b(peft_model)
    grads = _lora_grads(peft_model, torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_only_lora_weights_train_and_they_are_fp32_over_a_bf16_base(tiny_base):
    peft_model = _lora(load_model(str(tiny_base), None, True, CPU))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert peft_model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_all_linear_adapts_every_linear_layer_but_the_head(tiny_base):
    peft_model = attach_lora(load_model(str(tiny_base), None, False, CPU), r=4, alpha=8, dropout=0.0,
                             target_modules="all-linear", use_dora=False, use_rslora=False,
                             gradient_checkpointing=False, quantized=False)
    adapted = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_target_module_names_the_flag(tiny_base):
    with pytest.raises(ValueError, match=r"--lora_target_modules \['qkv'\]: .*all-linear"):
        _lora(load_model(str(tiny_base), None, False, CPU), targets=["qkv"])


def test_bf16_is_chosen_only_where_it_is_fast():
    expected = HAS_AVX512_BF16 or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    assert fast_bf16_available(CPU) == expected
    assert fast_bf16_available(torch.device("meta")) is False
