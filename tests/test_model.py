import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import DEVICES, REPO, nudge_lora_b

from alpaca_lora import model as model_module
from alpaca_lora.model import (DroppedLinear, LoraInputDropout, attach_lora, fast_bf16_available, load_model,
                                load_tokenizer, use_fast_lora_dropout)

CPU = torch.device("cpu")
HAS_AVX512_BF16 = "avx512_bf16" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")


def test_tokenizer_pads_with_unk_never_eos(tiny_base):
    tokenizer = load_tokenizer(str(tiny_base))
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.is_fast


def _loaded(folder: Path, loader: str) -> int:
    """MB of resident memory a fresh process holds after loading the tokenizer in `folder` by `loader`."""
    script = f"""
import torch, transformers
from pathlib import Path
from transformers import AutoTokenizer
from alpaca_lora.model import load_tokenizer
def resident():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1])
before = resident()
tokenizer = {loader}({str(folder)!r})
print((resident() - before) // 1024)
"""
    return int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc (Linux)")
def test_a_large_vocabulary_leaves_less_than_half_its_loading_memory_behind(vocabulary):
    # Qwen2's 151,936 tokens: transformers' loading keeps about 110 MB resident, about 73 of it construction copies
    # and freed heap (measured 111 against 38 MB)
    folder = vocabulary("qwen2")
    as_transformers_loads_it, ours = _loaded(folder, "AutoTokenizer.from_pretrained"), _loaded(folder, "load_tokenizer")
    assert as_transformers_loads_it > 60
    assert ours < as_transformers_loads_it / 2


@pytest.mark.parametrize("name, kept_copies", [("qwen2", True), ("llama-bpe", False)])
def test_a_loaded_tokenizer_drops_its_construction_copies_and_encodes_the_same(vocabulary, alpaca_rows, tmp_path,
                                                                               name, kept_copies):
    from transformers import AutoTokenizer

    folder = vocabulary(name)
    as_loaded, tokenizer = AutoTokenizer.from_pretrained(folder), load_tokenizer(str(folder))
    # transformers keeps Qwen2Tokenizer's vocabulary dict and merges list; Llama 3's loads as the generic class
    assert (len(as_loaded._vocab) > 150_000 and len(as_loaded._merges) > 150_000) if kept_copies \
        else not hasattr(as_loaded, "_vocab")
    assert getattr(tokenizer, "_vocab", None) is None and getattr(tokenizer, "_merges", None) is None
    texts = [row["instruction"] + "\n" + row["output"] for row in alpaca_rows[:20]]
    expected = as_loaded(texts)["input_ids"]
    assert tokenizer(texts)["input_ids"] == expected and sum(map(len, expected)) > 500
    assert tokenizer.get_vocab() == as_loaded.get_vocab()
    assert tokenizer.decode(expected[0]) == as_loaded.decode(expected[0])
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(texts)["input_ids"] == expected


def test_missing_base_model_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--base_model .*/absent: no such folder"):
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"--base_model ./absent: no such folder"):
        load_model("./absent", None, False, CPU)


def _lora(model, dropout=0.0, targets=("q_proj", "v_proj"), quantization=None, checkpointing=False, use_dora=False):
    torch.manual_seed(0)
    return attach_lora(model, r=4, alpha=8, dropout=dropout, target_modules=list(targets), use_dora=use_dora,
                       use_rslora=False, gradient_checkpointing=checkpointing, quantization=quantization)


def _lora_grads(peft_model, input_ids):
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def _grads_after_an_eval_pass(tiny_base, device=CPU):
    peft_model = _lora(load_model(str(tiny_base), "4bit", False, device), quantization="4bit")
    nudge_lora_b(peft_model, scale=0.02)
    input_ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    before = _lora_grads(peft_model, input_ids)
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=input_ids)
    return before, _lora_grads(peft_model, input_ids)


@pytest.mark.parametrize("device", DEVICES)
def test_4bit_lora_gradients_survive_an_evaluation_pass(tiny_base, device):
    before, after = _grads_after_an_eval_pass(tiny_base, torch.device(device))
    assert len(before) == 8  # A and B of q_proj and v_proj in 2 layers
    for name in before:
        assert before[name] is not None and after[name] is not None, name
        assert before[name].abs().sum() > 0, name
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


@pytest.mark.skipif(not HAS_AVX512_BF16 or torch.version.cuda is not None,
                    reason="the bitsandbytes repacking bug was seen on AVX512-BF16 CPUs with torch's CPU build "
                           "(not with torch 2.11+cu130 on a GPU machine's AVX512-BF16 CPU)")
def test_without_the_opt_out_bitsandbytes_breaks_4bit_gradients(tiny_base, monkeypatch):
    """The control for the test above: if this starts failing, bitsandbytes has fixed the bug and
    model._keep_4bit_cpu_weights_unpacked can go."""
    monkeypatch.setattr(model_module, "_keep_4bit_cpu_weights_unpacked", lambda model: None)
    before, after = _grads_after_an_eval_pass(tiny_base)
    assert any(after[n] is None or not torch.allclose(after[n], before[n]) for n in before)


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_base_trains_its_lora_weights(tiny_base, device):
    base = load_model(str(tiny_base), "8bit", False, torch.device(device))
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    peft_model = _lora(base, quantization="8bit")
    nudge_lora_b(peft_model, scale=0.02)
    input_ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    grads = _lora_grads(peft_model, input_ids)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_only_lora_weights_train_and_they_are_fp32_over_a_bf16_base(tiny_base):
    peft_model = _lora(load_model(str(tiny_base), None, True, CPU))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert peft_model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_all_linear_adapts_every_linear_layer_but_the_head(tiny_base):
    peft_model = attach_lora(load_model(str(tiny_base), None, False, CPU), r=4, alpha=8, dropout=0.0,
                             target_modules="all-linear", use_dora=False, use_rslora=False,
                             gradient_checkpointing=False, quantization=None)
    adapted = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@contextmanager
def _saved_for_backward():
    """The tensors autograd saves for backward inside the block, in order."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        yield saved


def test_fast_lora_dropout_drops_p_of_every_element_position_and_scales_the_rest():
    dropout = LoraInputDropout(0.05).train()
    x = torch.rand(2048, 1024) + 0.5  # no zeros, so a zero in the output is a dropped element
    torch.manual_seed(0)
    out = dropout(x)
    dropped = out == 0
    assert dropout.p == 3277 / 65536 and dropout.scale == 1 / (1 - 3277 / 65536)
    assert abs(dropped.float().mean().item() - dropout.p) < 5e-4  # 2M draws: 5 standard deviations
    # four elements share one 64-bit draw; each of its 16-bit lanes must drop at the same rate (the top lane
    # never dropped when the draw's sign bit was left at 0)
    for lane in range(4):
        assert abs(dropped.flatten().view(-1, 4)[:, lane].float().mean().item() - dropout.p) < 1e-3
    assert torch.equal(out[~dropped], x[~dropped] * dropout.scale)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)  # the global seed decides the mask, as for torch's dropout
    assert not torch.equal(dropout(x), out)
    torch.manual_seed(0)
    assert torch.equal(dropout.keep_mask(x), ~dropped)
    assert dropout.eval()(x) is x
    assert LoraInputDropout(0.999999).p == 65535 / 65536  # --lora_dropout takes any p below 1; never 1/0


def test_dropped_linear_keeps_its_input_and_mask_and_gives_the_unfused_gradients():
    """lora_A(dropout(x)) fused keeps x, shared by the projections that read it, and each one's bool mask; its
    output and gradients are those of dropping x and then applying the linear layer, under bf16 autocast and in
    fp32."""
    dropout = LoraInputDropout(0.1).train()
    for dtype, autocast in ((torch.bfloat16, True), (torch.float32, False)):
        x = (torch.rand(3, 40, 64) + 0.5).to(dtype).requires_grad_()
        weight_q, weight_v = (torch.randn(8, 64, requires_grad=True) for _ in range(2))  # fp32, as peft keeps them
        keep_q, keep_v = dropout.keep_mask(x), dropout.keep_mask(x)
        grad = torch.randn(3, 40, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with _saved_for_backward() as saved:
                out_q = DroppedLinear.apply(x, weight_q, keep_q, dropout.scale)
                out_v = DroppedLinear.apply(x, weight_v, keep_v, dropout.scale)
            kept = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
            assert kept == {x.data_ptr(), keep_q.data_ptr(), keep_v.data_ptr()}
            (out_q * grad).sum().backward()
            out_v.sum().backward()
            fused = (out_q, x.grad.clone(), weight_q.grad.clone(), weight_v.grad.clone())
            x.grad = weight_q.grad = weight_v.grad = None
            unfused_q = torch.nn.functional.linear(torch.where(keep_q, x * dropout.scale, 0), weight_q)
            (unfused_q * grad).sum().backward()
            torch.nn.functional.linear(torch.where(keep_v, x * dropout.scale, 0), weight_v).sum().backward()
        for got, expected in zip(fused, (unfused_q, x.grad, weight_q.grad, weight_v.grad)):
            assert got.dtype == expected.dtype and torch.equal(got, expected), dtype


def test_fast_lora_dropout_under_autocast_gives_peft_s_computation_without_the_fp32_copy(tiny_base):
    """Under bf16 autocast peft copies each LoRA input to fp32 and torch's dropout keeps an fp32 mask; with
    use_fast_lora_dropout the input stays bf16 and it and a bool mask are all that is kept. Dropout off, the layer's
    output is bit for bit peft's; on, it is base + B(A(dropped input)) * scaling with the mask the same seed draws."""
    stock = _lora(load_model(str(tiny_base), None, True, CPU), dropout=0.1)
    nudge_lora_b(stock, scale=0.02)
    x = torch.randn(2, 16, stock.config.hidden_size).to(torch.bfloat16)
    layer = stock.base_model.model.model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_eval = layer.eval()(x)
        layer.train()
        with _saved_for_backward() as saved:
            layer(x.requires_grad_())
        assert torch.float32 in {t.dtype for t in saved if t.numel() == x.numel()}  # peft's: an fp32 mask

        use_fast_lora_dropout(stock, keep_input_dtype=True)
        for adapted in (layer, stock.base_model.model.model.layers[1].self_attn.v_proj):
            assert type(adapted.lora_dropout["default"]) is torch.nn.Identity
            assert type(adapted.lora_A["default"].input_dropout) is LoraInputDropout
        assert torch.equal(layer.eval()(x), expected_eval)
        layer.train()
        torch.manual_seed(3)
        with _saved_for_backward() as saved:
            out = layer(x)
        assert {t.dtype for t in saved if t.numel() == x.numel()} == {torch.bfloat16, torch.bool}
        torch.manual_seed(3)
        lora_a = layer.lora_A["default"]
        dropped = torch.where(lora_a.input_dropout.keep_mask(x), x * lora_a.input_dropout.scale, 0)
        expected = (layer.base_layer(x) + layer.lora_B["default"](torch.nn.functional.linear(dropped, lora_a.weight))
                    * layer.scaling["default"])
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_a_dora_layer_keeps_its_dropout_module(tiny_base):
    """DoRA's forward takes the dropped input itself, so its dropout stays a module (the fast one)."""
    peft_model = _lora(load_model(str(tiny_base), None, False, CPU), dropout=0.1, use_dora=True)
    use_fast_lora_dropout(peft_model, keep_input_dtype=False)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_dropout["default"]) is LoraInputDropout
    assert not hasattr(layer.lora_A["default"], "input_dropout")


def test_fast_lora_dropout_leaves_no_dropout_alone(tiny_base):
    peft_model = _lora(load_model(str(tiny_base), None, False, CPU), dropout=0.0)
    use_fast_lora_dropout(peft_model, keep_input_dtype=False)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_dropout["default"]) is torch.nn.Identity and layer.cast_input_dtype_enabled


def test_unknown_target_module_names_the_flag(tiny_base):
    with pytest.raises(ValueError, match=r"--lora_target_modules qkv: qkv matches no linear layer of this model; its "
                                         r"linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                         r"up_proj, v_proj \(or pass all-linear\)"):
        _lora(load_model(str(tiny_base), None, False, CPU), targets=["qkv"])


@pytest.mark.parametrize("flags, fast", [("fpu sse2 avx2 avx512f avx512_bf16 amx_tile", True), ("avx2 amx_bf16", True),
                                         ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False), ("avx512_bf16x", False)])
def test_bf16_is_chosen_by_the_cpus_flags(monkeypatch, flags, fast):
    monkeypatch.setattr(model_module, "_cpu_info", lambda: f"processor\t: 0\nflags\t\t: {flags}\n")
    assert fast_bf16_available(CPU) is fast


def test_without_cpuinfo_or_on_other_devices_it_stays_fp32(monkeypatch):
    def no_cpuinfo():
        raise FileNotFoundError("/proc/cpuinfo")
    monkeypatch.setattr(model_module, "_cpu_info", no_cpuinfo)
    assert fast_bf16_available(CPU) is False
    assert fast_bf16_available(torch.device("meta")) is False


def _dequantized_weights(quantized_model) -> dict:
    import bitsandbytes as bnb

    weights = {}
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[name] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[name] = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127.0
    return weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization, tolerance", [("4bit", 1e-4), ("8bit", 0.05)])
def test_quantized_lora_gradients_equal_those_of_the_dequantized_weights(tiny_base, device, quantization, tolerance):
    """Not just non-zero: the LoRA gradients of a 4-bit base are those of an fp32 model holding the same
    (dequantized) weights. LLM.int8 also rounds the activations to 8 bits, hence its looser tolerance."""
    device = torch.device(device)
    quantized = load_model(str(tiny_base), quantization, False, device)
    reference = load_model(str(tiny_base), None, False, device)
    dequantized = _dequantized_weights(quantized)
    assert len(dequantized) == 2 * 7
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in dequantized:
                module.weight.copy_(dequantized[name])
    input_ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    grads = {}
    for label, model in (("quantized", _lora(quantized, quantization=quantization)), ("reference", _lora(reference))):
        nudge_lora_b(model, scale=0.02)
        grads[label] = _lora_grads(model, input_ids)
    assert grads["quantized"].keys() == grads["reference"].keys() and len(grads["reference"]) == 8
    for name, expected in grads["reference"].items():
        error = (grads["quantized"][name] - expected).norm() / expected.norm()
        assert error < tolerance, (name, error.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_gradient_checkpointing_keeps_the_lora_gradients_of_a_quantized_base(tiny_base, device, quantization):
    """8-bit uses reentrant checkpointing (see attach_lora), which passes gradients only through inputs that
    require them: every LoRA gradient must still arrive, equal to the one computed without recomputation."""
    input_ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    grads = []
    for checkpointing in (False, True):
        peft_model = _lora(load_model(str(tiny_base), quantization, False, torch.device(device)),
                           quantization=quantization, checkpointing=checkpointing)
        nudge_lora_b(peft_model, scale=0.02)
        grads.append(_lora_grads(peft_model, input_ids))
    assert len(grads[1]) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here; run this on a GPU machine")
@pytest.mark.parametrize("quantization", ["8bit", "4bit", None])
def test_gradient_checkpointing_frees_the_activations_on_a_gpu(tiny_base, quantization):
    """What checkpointing is for: the forward keeps only each layer's input. bitsandbytes' 8-bit matmul
    defeats the non-reentrant form (its input stays on the autograd context), which is why 8-bit uses the
    reentrant one; this measures the memory a training forward leaves allocated, with and without."""
    cuda = torch.device("cuda")
    input_ids = torch.randint(3, 500, (8, 512), generator=torch.Generator().manual_seed(0)).to(cuda)
    kept = {}
    for checkpointing in (False, True):
        peft_model = _lora(load_model(str(tiny_base), quantization, False, cuda), quantization=quantization,
                           checkpointing=checkpointing).train()
        before = torch.cuda.memory_allocated(cuda)
        hidden = peft_model.get_base_model().get_decoder()(input_ids=input_ids).last_hidden_state
        kept[checkpointing] = torch.cuda.memory_allocated(cuda) - before - hidden.numel() * hidden.element_size()
        del hidden, peft_model
    # per layer: 1 saved input of [8 x 512 x 64] against ~20 activations of that size or larger without
    assert kept[True] < 0.25 * kept[False], kept
